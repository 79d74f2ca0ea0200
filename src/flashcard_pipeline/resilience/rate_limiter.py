"""Rate limiters for one limit: in memory (one bucket, or sharded) with Go-style reservations.

A limiter admits at most ``rate`` tokens per second with bursts of up to ``burst``, never more than
``rate * T + burst`` over any interval ``T``, sharded or not. ``acquire`` waits its turn (FIFO: the
waiting is a reservation in the bucket's debt, not polling); ``reserve`` returns a
:class:`TokenReservation` with the semantics of Go's ``golang.org/x/time/rate``: it says when to
act, changes nothing if it cannot be honoured within ``max_wait`` or asks for more than the burst,
and can be executed once or cancelled (giving back what tokens reserved after it allow).

Time comes from an injectable :class:`~flashcard_pipeline.resilience.clock.Clock`; the arithmetic
lives in :mod:`~flashcard_pipeline.resilience.token_bucket`. The Redis limiter with the same API is
in :mod:`~flashcard_pipeline.resilience.rate_limiter_redis`; the per-provider policy that puts
requests and tokens limits around each call is in
:mod:`~flashcard_pipeline.resilience.rate_limit_policy`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import itertools
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any, Protocol, TypeVar

from flashcard_pipeline.resilience.clock import Clock, SystemClock
from flashcard_pipeline.resilience.token_bucket import (
    INF,
    Algorithm,
    AlgorithmName,
    Take,
    make_algorithm,
)

__all__ = [
    "DEFAULT_RESERVATION_TTL",
    "AcquireMetrics",
    "Limiter",
    "RateLimiter",
    "ReservationError",
    "ReservationExpiredError",
    "ReservationMetrics",
    "ReservationState",
    "ShardedRateLimiter",
    "TokenReservation",
    "shard_choices",
    "shard_count",
]

T = TypeVar("T")

#: Seconds after its time to act that an unexecuted reservation stays valid.
DEFAULT_RESERVATION_TTL = 60.0
#: The plan's floor: a shard must hold at least this many tokens to be worth having.
MIN_SHARD_CAPACITY = 10.0
#: The shortest poll of a call waiting for two shards at once.
MIN_SPLIT_WAIT = 1e-3
#: Waits shorter than this are rounding noise (``t + 1e-17 == t``): act instead of sleeping forever.
TIME_EPSILON = 1e-9


class ReservationError(RuntimeError):
    """A reservation used against its rules: refused, executed twice, or already cancelled."""


class ReservationExpiredError(ReservationError):
    """The reservation was not executed before ``expires_at``; its tokens are spent."""


class ReservationState(StrEnum):
    REFUSED = "refused"
    PENDING = "pending"
    WAITING = "waiting"
    EXECUTED = "executed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"


@dataclass
class ReservationMetrics:
    """What happened to the reservations of one limiter (only the event loop writes these)."""

    made: int = 0
    refused: int = 0
    executed: int = 0
    cancelled: int = 0
    expired: int = 0
    #: Seconds between making and executing, summed over executed reservations.
    wait_time: float = 0.0
    #: Tokens that cancels gave back.
    returned: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class AcquireMetrics:
    """Counters of ``acquire``: grants, tokens, waits, refunds of unused tokens."""

    acquired: int = 0
    tokens: float = 0.0
    waited: int = 0
    wait_time: float = 0.0
    refunded: float = 0.0
    charged: float = 0.0
    #: Waiters cancelled while waiting (their tokens went back).
    abandoned: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


Part = tuple[Algorithm, Take]


class _Host(Protocol):
    """What a reservation needs from the limiter that made it."""

    clock: Clock
    reservation_metrics: ReservationMetrics

    async def _cancel_parts(self, parts: Sequence[Any]) -> float: ...
    async def _frozen(self, parts: Sequence[Any]) -> float: ...
    def _forget(self, reservation: TokenReservation) -> None: ...


@dataclass(eq=False)
class TokenReservation:
    """A promise of ``tokens`` at ``time_to_act`` (the limiter's clock), valid until ``expires_at``.

    ``ok`` is False when the limiter refused (more than the burst, or not within ``max_wait``); such
    a reservation changed nothing and cannot execute. A pause after a 429 moves ``time_to_act`` and
    ``expires_at`` back by the pause.
    """

    ok: bool
    tokens: float
    time_to_act: float
    #: Seconds from making to ``time_to_act`` as first granted (``inf`` when refused).
    delay: float
    expires_at: float
    made_at: float
    _host: _Host = field(repr=False)
    _parts: tuple[Any, ...] = field(default=(), repr=False)
    _frozen_seen: float = field(default=0.0, repr=False)
    state: ReservationState = ReservationState.PENDING

    def expired(self, now: float | None = None) -> bool:
        now = self._host.clock.monotonic() if now is None else now
        return self.ok and now > self.expires_at

    async def execute(self, fn: Callable[[], Awaitable[T]] | Callable[[], T]) -> T:
        """Wait until the time to act (following pauses), then run ``fn`` once and return its result.

        Cancelling the waiting task cancels the reservation, which gives its tokens back.
        """
        if not self.ok:
            raise ReservationError(f"reservation of {self.tokens:g} tokens was refused")
        if self.state is not ReservationState.PENDING:
            raise ReservationError(f"reservation already {self.state.value}")
        host = self._host
        if self.expired():
            self._expire()
            raise ReservationExpiredError(f"reservation expired {host.clock.monotonic() - self.expires_at:.3f}s ago")
        self.state = ReservationState.WAITING
        try:
            await self._wait()
        except asyncio.CancelledError:
            self.state = ReservationState.PENDING
            await self.cancel()
            raise
        now = host.clock.monotonic()
        if now > self.expires_at:
            self._expire()
            raise ReservationExpiredError("reservation expired while waiting")
        self.state = ReservationState.EXECUTED
        host._forget(self)
        metrics = host.reservation_metrics
        metrics.executed += 1
        metrics.wait_time += now - self.made_at
        result = fn()
        if inspect.isawaitable(result):
            return await result  # type: ignore[no-any-return]
        return result

    async def cancel(self) -> float:
        """Give back what can be given back (Go's rule); returns the tokens returned (0 once late)."""
        if not self.ok or self.state is not ReservationState.PENDING:
            return 0.0
        if self.expired():
            self._expire()
            return 0.0
        host = self._host
        await self._follow_pauses()
        returned = await host._cancel_parts(self._parts)
        self.state = ReservationState.CANCELLED
        host._forget(self)
        host.reservation_metrics.cancelled += 1
        host.reservation_metrics.returned += returned
        return returned

    def _expire(self) -> None:
        self.state = ReservationState.EXPIRED
        self._host._forget(self)
        self._host.reservation_metrics.expired += 1

    async def _follow_pauses(self) -> None:
        frozen = await self._host._frozen(self._parts)
        if frozen > self._frozen_seen:
            shift = frozen - self._frozen_seen
            self._frozen_seen = frozen
            self.time_to_act += shift
            self.expires_at += shift
            for part in self._parts:
                if isinstance(part, tuple):
                    take = part[1]
                    # A sliding-window log moves its own entries; a bucket's takes are moved here.
                    take.time_to_act = max(take.time_to_act, self.time_to_act)
                else:
                    part.time_to_act += shift

    async def _wait(self) -> None:
        clock = self._host.clock
        while True:
            await self._follow_pauses()
            delay = self.time_to_act - clock.monotonic()
            if delay <= TIME_EPSILON:
                return
            await clock.sleep(delay)


class Limiter(Protocol):
    """The public API shared by the in-memory and the Redis limiters."""

    name: str

    @property
    def rate(self) -> float: ...
    @property
    def burst(self) -> float: ...
    async def acquire(self, n: float = 1.0, *, key: str | None = None) -> float: ...
    async def try_acquire(self, n: float = 1.0, *, key: str | None = None) -> bool: ...
    async def reserve(self, n: float = 1.0, max_wait: float = INF, *, key: str | None = None) -> TokenReservation: ...
    async def refund(self, n: float, *, key: str | None = None) -> None: ...
    async def pause(self, seconds: float) -> None: ...
    async def set_limit(self, rate: float, burst: float) -> None: ...
    async def state(self) -> dict[str, Any]: ...


def shard_count(max_qps: float, capacity: float, override: int | None = None) -> int:
    """The plan's rule: ``max_qps / 2`` shards, fewer if a shard would hold under 10 tokens.

    ``override`` (``RL_SHARDS``) wins when given.
    """
    if override is not None:
        if override < 1:
            raise ValueError(f"shard count must be at least 1, got {override}")
        return override
    if not math.isfinite(max_qps) or not math.isfinite(capacity):
        return 1
    count = max(1, int(max_qps // 2))
    return max(1, min(count, int(capacity // MIN_SHARD_CAPACITY)))


def shard_choices(key: str, shards: int) -> tuple[int, int]:
    """Two distinct shards for ``key`` from its MD5 (stable across processes and runs)."""
    if shards < 2:
        return 0, 0
    digest = hashlib.md5(key.encode("utf-8"), usedforsecurity=False).digest()
    first = int.from_bytes(digest[:8], "big") % shards
    second = int.from_bytes(digest[8:], "big") % shards
    if second == first:
        second = (first + 1) % shards
    return first, second


class RateLimiter:
    """One limit in this process: ``rate`` tokens per second, bursts of ``burst``.

    ``algorithm`` is ``token_bucket`` (default) or ``sliding_window`` (``burst`` tokens per window of
    ``burst / rate`` seconds). Safe to share between tasks and threads: each bucket has its own lock,
    held only for the arithmetic.
    """

    def __init__(self, rate: float, burst: float, *, algorithm: AlgorithmName = "token_bucket",
                 clock: Clock | None = None, name: str = "limit",
                 reservation_ttl: float = DEFAULT_RESERVATION_TTL) -> None:
        self.clock: Clock = clock or SystemClock()
        # The real clock's method is a wrapper; calling time.monotonic directly saves it on every acquire.
        self._monotonic = time.monotonic if type(self.clock) is SystemClock else self.clock.monotonic
        self.name = name
        self.algorithm: AlgorithmName = algorithm
        self.reservation_ttl = reservation_ttl
        self.metrics = AcquireMetrics()
        self.reservation_metrics = ReservationMetrics()
        self._pending: dict[int, TokenReservation] = {}
        self._shards: list[Algorithm] = self._make_shards(rate, burst, self._monotonic())
        self._bucket = self._shards[0]
        self._rate = float(rate)
        self._burst = float(burst)

    def _make_shards(self, rate: float, burst: float, now: float) -> list[Algorithm]:
        return [make_algorithm(self.algorithm, rate, burst, now)]

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, rate={self._rate!r}, burst={self._burst!r}, "
                f"algorithm={self.algorithm!r}, shards={len(self._shards)})")

    @property
    def rate(self) -> float:
        """Tokens per second across all shards."""
        return self._rate

    @property
    def burst(self) -> float:
        return self._burst

    @property
    def shards(self) -> int:
        return len(self._shards)

    # -- acquiring ---------------------------------------------------------------------------------

    async def acquire(self, n: float = 1.0, *, key: str | None = None) -> float:
        """Wait until ``n`` tokens are granted; returns the seconds waited.

        Raises ``ValueError`` for a request no wait can satisfy (more than the burst, or a zero rate).
        """
        bucket = self._bucket
        metrics = self.metrics
        with bucket.lock:
            now = self._monotonic()  # inside the lock: readings reach the bucket in order
            if bucket.try_take(now, n):
                metrics.acquired += 1
                metrics.tokens += n
                return 0.0
            take = bucket.reserve(now, n, INF)
        if take is None:
            raise ValueError(self._never(n))
        metrics.acquired += 1
        metrics.tokens += n
        delay = take.time_to_act - now
        if delay <= 0:
            return 0.0
        return await self._await_parts(((bucket, take),), take.time_to_act, bucket.frozen_total, now)

    async def _await_parts(self, parts: Sequence[Part], time_to_act: float, frozen_seen: float,
                           started: float) -> float:
        clock = self.clock
        try:
            while True:
                frozen = max(p[0].frozen_total for p in parts)
                if frozen > frozen_seen:
                    time_to_act += frozen - frozen_seen
                    frozen_seen = frozen
                    for _, take in parts:
                        take.time_to_act = max(take.time_to_act, time_to_act)
                delay = time_to_act - clock.monotonic()
                if delay <= TIME_EPSILON:
                    break
                await clock.sleep(delay)
        except asyncio.CancelledError:
            await self._cancel_parts(parts)
            self.metrics.abandoned += 1
            raise
        waited = clock.monotonic() - started
        self.metrics.waited += 1
        self.metrics.wait_time += waited
        return waited

    def _never(self, n: float) -> str:
        if n > self._burst:
            return f"{self.name}: {n:g} tokens exceed the burst of {self._burst:g}"
        return f"{self.name}: {n:g} tokens can never be granted at rate {self._rate:g}/s"

    async def try_acquire(self, n: float = 1.0, *, key: str | None = None) -> bool:
        """Take ``n`` tokens if they are there now; never waits."""
        parts, _ = self._take_now(self._monotonic(), n, key, 0.0)
        if parts is None:
            return False
        self.metrics.acquired += 1
        self.metrics.tokens += n
        return True

    async def reserve(self, n: float = 1.0, max_wait: float = INF, *, key: str | None = None) -> TokenReservation:
        """Reserve ``n`` tokens to be used within ``max_wait`` seconds, or get a refused reservation."""
        if n < 0 or math.isnan(n):
            raise ValueError(f"cannot reserve {n!r} tokens")
        now = self._monotonic()
        parts, _ = self._reserve_parts(now, n, key, max_wait)
        metrics = self.reservation_metrics
        if parts is None:
            metrics.refused += 1
            return TokenReservation(ok=False, tokens=n, time_to_act=INF, delay=INF, expires_at=-INF, made_at=now,
                                    _host=self, state=ReservationState.REFUSED)
        time_to_act = max((p[1].time_to_act for p in parts), default=now)
        reservation = TokenReservation(
            ok=True, tokens=n, time_to_act=time_to_act, delay=max(0.0, time_to_act - now),
            expires_at=time_to_act + self.reservation_ttl, made_at=now, _host=self, _parts=tuple(parts),
            _frozen_seen=max((p[0].frozen_total for p in parts), default=0.0))
        metrics.made += 1
        self._sweep(now)
        self._pending[id(reservation)] = reservation
        return reservation

    def _sweep(self, now: float) -> None:
        """Count reservations nobody executed or cancelled in time as expired (and stop tracking them)."""
        stale = [r for r in self._pending.values() if now > r.expires_at]
        for reservation in stale:
            reservation._expire()

    def _forget(self, reservation: TokenReservation) -> None:
        self._pending.pop(id(reservation), None)

    async def _cancel_parts(self, parts: Sequence[Any]) -> float:
        now = self._monotonic()
        returned = 0.0
        for algorithm, take in parts:
            with algorithm.lock:
                returned += algorithm.cancel(now, take)
        return returned

    async def _frozen(self, parts: Sequence[Any]) -> float:
        return max((p[0].frozen_total for p in parts), default=0.0)

    def _reserve_parts(self, now: float, n: float, key: str | None,
                       max_wait: float) -> tuple[list[Part] | None, float]:
        return self._take_now(now, n, key, max_wait)

    # -- what the per-call policy uses ---------------------------------------------------------------

    def _take_now(self, now: float, n: float, key: str | None, max_wait: float) -> tuple[list[Part] | None, float]:
        """Reserve ``n`` within ``max_wait``: (parts, 0) or (None, seconds until it would fit)."""
        bucket = self._bucket
        with bucket.lock:
            take = bucket.reserve(now, n, max_wait)
            if take is None:
                return None, bucket.wait_for(now, n)
        return [(bucket, take)], 0.0

    def _take_wait(self, now: float, n: float, key: str | None) -> float:
        bucket = self._bucket
        with bucket.lock:
            return bucket.wait_for(now, n)

    def _untake(self, parts: Sequence[Part]) -> None:
        now = self._monotonic()
        for algorithm, take in parts:
            with algorithm.lock:
                amount = take.amount
                if algorithm.cancel(now, take) == 0 and take.amount > 0:
                    # Already due (or others reserved behind it): give the tokens back as a refund.
                    algorithm.refund(now, take, amount)

    def _refund_parts(self, parts: Sequence[Part], amount: float) -> None:
        """Give ``amount`` unused tokens back to the shards they came from, largest part first."""
        if amount <= 0:
            return
        now = self._monotonic()
        self.metrics.refunded += amount
        for algorithm, take in sorted(parts, key=lambda p: -p[1].amount):
            share = min(amount, take.amount)
            if share <= 0:
                continue
            with algorithm.lock:
                algorithm.refund(now, take, share)
            amount -= share
            if amount <= 0:
                return

    def _charge_parts(self, parts: Sequence[Part], amount: float) -> None:
        if amount <= 0:
            return
        self.metrics.charged += amount
        algorithm, take = parts[0] if parts else (self._bucket, None)
        with algorithm.lock:
            algorithm.charge(self._monotonic(), take, amount)

    async def settle_grant(self, parts: Sequence[Part], delta: float, used: float) -> None:
        """Refund ``delta`` unused tokens of a grant (charge ``-delta`` if negative); ``used`` is the group's
        business in memory (it keeps its own log)."""
        if delta > 0:
            self._refund_parts(parts, delta)
        elif delta < 0:
            self._charge_parts(parts, -delta)

    # -- control -------------------------------------------------------------------------------------

    async def refund(self, n: float, *, key: str | None = None) -> None:
        """Give back ``n`` tokens that a grant did not use (e.g. the response reported fewer)."""
        if n <= 0:
            return
        bucket = self._bucket if key is None else self._shards[shard_choices(key, len(self._shards))[0]]
        with bucket.lock:
            bucket.refund(self._monotonic(), None, n)
        self.metrics.refunded += n

    async def pause(self, seconds: float) -> None:
        """Nobody acquires for ``seconds`` (after a 429), waiters included; the bucket drains."""
        if seconds <= 0 or math.isnan(seconds):
            return
        now = self._monotonic()
        for algorithm in self._shards:
            with algorithm.lock:
                algorithm.pause(now, seconds)

    async def set_limit(self, rate: float, burst: float) -> None:
        now = self._monotonic()
        count = len(self._shards)
        for algorithm in self._shards:
            with algorithm.lock:
                algorithm.set_limit(now, rate / count, burst / count)
        self._rate, self._burst = float(rate), float(burst)

    def paused_for(self) -> float:
        now = self._monotonic()
        return max(0.0, max(getattr(a, "frozen_until", -INF) for a in self._shards) - now)

    def available(self) -> float:
        now = self._monotonic()
        total = 0.0
        for algorithm in self._shards:
            with algorithm.lock:
                total += algorithm.available(now)
        return total

    async def state(self) -> dict[str, Any]:
        return self.snapshot()

    def snapshot(self) -> dict[str, Any]:
        """Rate, tokens available now, pause, and the acquire and reservation metrics, as plain JSON."""
        self._sweep(self._monotonic())
        return {
            "name": self.name,
            "backend": "memory",
            "algorithm": self.algorithm,
            "shards": len(self._shards),
            "rate_per_second": _finite(self._rate),
            "rate_per_minute": _finite(self._rate * 60),
            "burst": self._burst,
            "available": _finite(self.available()) if math.isfinite(self._rate) else None,
            "paused_for": round(self.paused_for(), 3),
            "acquire": self.metrics.to_dict(),
            "reservations": self.reservation_metrics.to_dict(),
            "pending_reservations": len(self._pending),
        }


def _finite(value: float) -> float | None:
    """JSON has no infinity: an unlimited rate is reported as null."""
    return value if math.isfinite(value) else None


class ShardedRateLimiter(RateLimiter):
    """The same limit split over ``shards`` buckets, each with ``rate / shards`` and ``burst / shards``.

    A call with ``key`` goes to the less loaded of the key's two MD5-chosen shards (power of two
    choices), falls back to the other when the first cannot serve it now, and takes from both
    when neither alone can (``acquire`` and the policy only at once: a split acquire polls). A
    ``reserve`` those two cannot honour within ``max_wait`` is spread over as many shards as it
    takes, every part acting at the same instant, so any ``n`` up to the global burst is honoured
    as Go's limiter would. The shards' limits add up to the global one, so the global limit holds
    whatever the split.
    ``shards`` defaults to :func:`shard_count` (``max_qps / 2``, at least 10 tokens per shard). Calls
    without a key are spread round-robin.

    ``min_shard_burst`` is the largest single take (the policy's requests limit: one call). While the
    burst cannot give every shard that much (an adaptive cut, a header limit), only as many shards are
    used as can hold it, at least one, and the others are set aside empty: without this a shard of
    ``0.3`` requests would refuse every call. Set-aside shards rejoin empty when the burst allows, so no
    change of the number in use ever adds tokens.
    """

    def __init__(self, rate: float, burst: float, *, shards: int | None = None, max_qps: float | None = None,
                 algorithm: AlgorithmName = "token_bucket", clock: Clock | None = None, name: str = "limit",
                 reservation_ttl: float = DEFAULT_RESERVATION_TTL, min_shard_burst: float = 0.0) -> None:
        self._count = shard_count(rate if max_qps is None else max_qps, burst, shards)
        self._min_shard_burst = float(min_shard_burst)
        self._round_robin = itertools.count()
        self._choices: dict[str, tuple[int, int]] = {}
        #: Every shard, those set aside included (``_shards`` is the leading ones in use).
        self._all: list[Algorithm] = []
        super().__init__(rate, burst, algorithm=algorithm, clock=clock, name=name, reservation_ttl=reservation_ttl)

    def _make_shards(self, rate: float, burst: float, now: float) -> list[Algorithm]:
        active = self._in_use(burst)
        self._all = [make_algorithm(self.algorithm, rate / active, burst / active, now) if index < active
                     else make_algorithm(self.algorithm, 0.0, 0.0, now) for index in range(self._count)]
        return self._all[:active]

    def _in_use(self, burst: float) -> int:
        """All the shards, or only as many as each hold ``min_shard_burst`` (at least one)."""
        count, unit = self._count, self._min_shard_burst
        if unit > 0 and burst / count < unit:
            count = max(1, min(count, int(burst // unit)))
            while count > 1 and burst / count < unit:  # float division may round below the unit
                count -= 1
        return count

    @property
    def configured_shards(self) -> int:
        """Shards asked for; :attr:`shards` is how many are in use now."""
        return self._count

    def _pair(self, key: str | None) -> tuple[int, int]:
        count = len(self._shards)
        if key is None:
            first = next(self._round_robin) % count
            return first, (first + 1) % count
        pair = self._choices.get(key)
        if pair is None:
            if len(self._choices) > 65536:
                self._choices.clear()
            pair = self._choices[key] = shard_choices(key, count)
        return pair

    async def acquire(self, n: float = 1.0, *, key: str | None = None) -> float:
        started = now = self._monotonic()
        while True:
            parts, wait = self._take_now(now, n, key, INF)
            if parts is not None:
                break
            if wait == INF:
                raise ValueError(self._never(n))
            await self.clock.sleep(wait)  # a call split over two shards polls (see _combine_or_wait)
            now = self._monotonic()
        self.metrics.acquired += 1
        self.metrics.tokens += n
        time_to_act = max(p[1].time_to_act for p in parts)
        if time_to_act <= now:
            waited = now - started
            if waited > 0:
                self.metrics.waited += 1
                self.metrics.wait_time += waited
            return waited
        return await self._await_parts(parts, time_to_act, max(p[0].frozen_total for p in parts), started)

    def _never(self, n: float) -> str:
        shard_burst = self._burst / len(self._shards)
        if len(self._shards) > 1 and n > 2 * shard_burst:
            return (f"{self.name}: {n:g} tokens exceed what two shards hold ({2 * shard_burst:g}); "
                    "use fewer shards for calls this large")
        return super()._never(n)

    def _take_now(self, now: float, n: float, key: str | None, max_wait: float) -> tuple[list[Part] | None, float]:
        if len(self._shards) == 1:
            return super()._take_now(now, n, key, max_wait)
        a, b = self._pair(key)
        first, second = self._shards[a], self._shards[b]
        with first.lock:
            available_first = first.available(now)
        with second.lock:
            available_second = second.available(now)
        if available_second > available_first:
            first, second = second, first
        for shard in (first, second):
            with shard.lock:
                take = shard.reserve(now, n, 0.0)
            if take is not None:
                return [(shard, take)], 0.0
        # Both locks, always in shard order, so two threads combining the same pair cannot deadlock.
        low, high = (self._shards[a], self._shards[b]) if a < b else (self._shards[b], self._shards[a])
        with low.lock, high.lock:
            return self._combine_or_wait(now, n, first, second, max_wait)

    @staticmethod
    def _combine_or_wait(now: float, n: float, first: Algorithm, second: Algorithm,
                         max_wait: float) -> tuple[list[Part] | None, float]:
        """Neither shard alone can serve ``n`` now: take from both if together they hold it now, else
        reserve on the shard that can serve it soonest.

        A call split over two shards is only ever taken *now*: two parts waiting for different instants
        would make the earlier one act late, after its shard has refilled for others (which breaks the
        bound). So a call larger than one shard that cannot be served now gets ``(None, wait)`` and the
        caller polls.
        """
        have_first, have_second = max(0.0, first.available(now)), max(0.0, second.available(now))
        if have_first + have_second >= n and n - have_first <= second.burst:
            part_first = min(n, have_first)
            taken_first = first.reserve(now, part_first, 0.0)
            taken_second = second.reserve(now, n - part_first, 0.0)
            if taken_first is not None and taken_second is not None:
                return [(first, taken_first), (second, taken_second)], 0.0
            for shard, taken in ((first, taken_first), (second, taken_second)):
                if taken is not None:
                    shard.cancel(now, taken)
        single = min((first, second), key=lambda shard: shard.wait_for(now, n))
        wait = single.wait_for(now, n)
        if wait < INF:
            if wait > max_wait:
                return None, wait
            taken = single.reserve(now, n, max_wait)
            return ([(single, taken)], 0.0) if taken is not None else (None, wait)
        if n > first.burst + second.burst:
            return None, INF
        share = _balanced_share(now, n, first, second)
        return None, max(first.wait_for(now, share), second.wait_for(now, n - share), MIN_SPLIT_WAIT)

    def _reserve_parts(self, now: float, n: float, key: str | None,
                       max_wait: float) -> tuple[list[Part] | None, float]:
        parts, wait = self._take_now(now, n, key, max_wait)
        if parts is not None or len(self._shards) == 1 or n <= 0 or not max_wait >= 0:
            return parts, wait
        return self._spread(now, n, key, max_wait)

    def _spread(self, now: float, n: float, key: str | None, max_wait: float) -> tuple[list[Part] | None, float]:
        """Reserve ``n`` on as many shards as it takes, all parts acting at the earliest instant they
        can together (each part accounted as acting then, so no shard admits more than its own bound).

        The key's two shards are used first, then the fullest others. Nothing changes unless it fits
        within ``max_wait``.
        """
        shards = self._shards
        preferred = set(self._pair(key)) if key is not None else set()
        with contextlib.ExitStack() as stack:
            for shard in shards:  # in shard order, as everywhere else: no deadlock
                stack.enter_context(shard.lock)

            def split(at: float) -> list[tuple[Algorithm, float]] | None:
                caps = sorted((i not in preferred, -shard.capacity_at(now, at), i) for i, shard in enumerate(shards))
                plan: list[tuple[Algorithm, float]] = []
                left = n
                for _, negative_cap, index in caps:
                    if left <= 0:
                        break
                    if negative_cap < 0:
                        part = min(-negative_cap, left)
                        plan.append((shards[index], part))
                        left -= part
                # What float rounding leaves of a sum of shard bursts is not a shortfall.
                return plan if left <= n * 1e-12 else None

            at = now
            plan = split(now)
            if plan is None:
                fills = (shard.wait_for(now, shard.burst) for shard in shards)
                latest = now + max((wait for wait in fills if wait < INF), default=0.0)
                if split(latest) is None:
                    return None, INF
                deadline = now + max_wait
                if deadline < latest and split(deadline) is None:
                    return None, _earliest(split, deadline, latest) - now
                at = _earliest(split, now, min(latest, deadline))
                plan = split(at)
            parts: list[Part] = []
            for shard, amount in plan or ():
                take = shard.reserve_at(now, amount, at)
                if take is None:
                    raise RuntimeError(f"{self.name}: a shard refused the share its own capacity allowed")
                parts.append((shard, take))
        return parts, 0.0

    def _take_wait(self, now: float, n: float, key: str | None) -> float:
        if len(self._shards) == 1:
            return super()._take_wait(now, n, key)
        a, b = self._pair(key)
        waits = []
        for shard in (self._shards[a], self._shards[b]):
            with shard.lock:
                waits.append(shard.wait_for(now, n))
        return min(waits)

    async def pause(self, seconds: float) -> None:
        """Every shard pauses, set-aside ones too: a waiter holding a part there must follow the pause."""
        if seconds <= 0 or math.isnan(seconds):
            return
        now = self._monotonic()
        for algorithm in self._all:
            with algorithm.lock:
                algorithm.pause(now, seconds)

    async def set_limit(self, rate: float, burst: float) -> None:
        """Split the new limit over as many shards as can each hold ``min_shard_burst``; the rest admit nothing."""
        now = self._monotonic()
        active = self._in_use(burst)
        for index, algorithm in enumerate(self._all):
            with algorithm.lock:
                if index < active:
                    algorithm.set_limit(now, rate / active, burst / active)
                else:
                    algorithm.set_limit(now, 0.0, 0.0)
        if active != len(self._shards):
            self._shards = self._all[:active]
            self._choices.clear()  # a key's two shards are chosen among those in use
        self._rate, self._burst = float(rate), float(burst)

    async def refund(self, n: float, *, key: str | None = None) -> None:
        if n <= 0:
            return
        if len(self._shards) == 1:
            await super().refund(n)
            return
        now = self._monotonic()
        a, b = self._pair(key)
        target = min((self._shards[a], self._shards[b]), key=lambda shard: shard.available(now))
        with target.lock:
            target.refund(now, None, n)
        self.metrics.refunded += n


def _earliest(fits: Callable[[float], object | None], low: float, high: float) -> float:
    """The earliest instant in ``(low, high]`` where ``fits`` is not None, given it is at ``high`` and not at
    ``low`` (it only ever starts to fit as time passes): bisection down to adjacent floats."""
    for _ in range(200):
        middle = (low + high) / 2
        if not low < middle < high:
            break
        if fits(middle) is None:
            low = middle
        else:
            high = middle
    return high


def _balanced_share(now: float, n: float, first: Algorithm, second: Algorithm) -> float:
    """How much of ``n`` to take from ``first`` so both parts are ready at the same instant.

    Bisection on the two waits (one grows with the share, the other shrinks), so the parts act
    together and neither shard's tokens are used later than its own accounting says.
    """
    low, high = max(0.0, n - second.burst), min(n, first.burst)
    for _ in range(48):
        middle = (low + high) / 2
        if first.wait_for(now, middle) < second.wait_for(now, n - middle):
            low = middle
        else:
            high = middle
    return (low + high) / 2
