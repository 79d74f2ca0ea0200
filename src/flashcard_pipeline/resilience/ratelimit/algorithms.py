"""Rate-limit algorithms as plain state machines on explicit time.

Nothing here reads a clock, sleeps or awaits: every operation takes ``now`` (seconds on a monotonic
scale), so the same code runs under the real clock, a fake one and (translated to Lua) inside Redis,
and tests can walk it through any sequence of instants, backwards ones included.

Two algorithms share one interface (:class:`Algorithm`):

* :class:`TokenBucket` (the default): Go's ``golang.org/x/time/rate.Limiter``. Tokens refill
  continuously at ``rate`` per second up to ``burst``; a reservation may take the bucket into debt
  and is told when to act, so waiters queue in order without polling.
* :class:`SlidingWindowLog`: at most ``burst`` tokens in any window of ``burst / rate`` seconds,
  exactly what providers that count "requests in the last minute" enforce.

Both admit at most ``rate * T + burst`` tokens over any interval of length ``T`` (counted at the
instants the holders are told to act), and both can be paused (after a 429 nobody acts until the
pause ends, and reservations already waiting move back by the pause).

They are not thread-safe by themselves: each carries a ``lock`` that the in-memory limiters hold
around every call.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from typing import Literal, Protocol

__all__ = [
    "ALGORITHMS",
    "INF",
    "Algorithm",
    "AlgorithmName",
    "SlidingWindowLog",
    "Take",
    "TokenBucket",
    "make_algorithm",
]

INF = math.inf
AlgorithmName = Literal["token_bucket", "sliding_window"]
ALGORITHMS: tuple[AlgorithmName, ...] = ("token_bucket", "sliding_window")


class Take:
    """What a granted take or reservation holds: enough to cancel it or to refund part of it later."""

    __slots__ = ("amount", "rate", "time_to_act")

    def __init__(self, amount: float, time_to_act: float, rate: float) -> None:
        self.amount = amount
        self.time_to_act = time_to_act
        #: The rate when it was made (a cancel computes with it, as Go's does).
        self.rate = rate


class Algorithm(Protocol):
    rate: float
    burst: float
    lock: threading.Lock
    #: Seconds of pause added so far: a waiter that saw a smaller value must wait the difference more.
    frozen_total: float

    def reserve(self, now: float, amount: float, max_wait: float) -> Take | None:
        """Take ``amount`` to act at ``Take.time_to_act`` if that is within ``max_wait``; else change nothing."""
        ...

    def try_take(self, now: float, amount: float) -> bool:
        """A fast ``reserve(now, amount, 0)`` that allocates nothing; False means "use ``reserve``"."""
        ...

    def wait_for(self, now: float, amount: float) -> float:
        """Seconds until ``amount`` could be taken (``inf`` if never); changes nothing."""
        ...

    def cancel(self, now: float, take: Take) -> float:
        """Give back what can still be given back of a reservation; returns how much."""
        ...

    def refund(self, now: float, take: Take | None, amount: float) -> None:
        """Give back ``amount`` of a take that turned out to need less (the response's real usage)."""
        ...

    def charge(self, now: float, take: Take | None, amount: float) -> None:
        """Record ``amount`` more than a take reserved, without waiting (it has been spent already)."""
        ...

    def pause(self, now: float, seconds: float) -> float:
        """Nobody acts before ``now + seconds``; returns the pause actually added."""
        ...

    def set_limit(self, now: float, rate: float, burst: float) -> None: ...

    def available(self, now: float) -> float:
        """Tokens that could be taken at ``now`` (negative while in debt)."""
        ...


def _check(rate: float, burst: float) -> None:
    if math.isnan(rate) or rate < 0:
        raise ValueError(f"rate must be >= 0 (inf for no limit), got {rate!r}")
    if not math.isfinite(burst) or burst < 0:
        raise ValueError(f"burst must be a finite number >= 0, got {burst!r}")


def _free_take(rate: float, amount: float, at: float) -> Take | None:
    """What every algorithm grants as it is: any amount from an unlimited limit, nothing from any limit."""
    if rate == INF:
        return Take(amount, at, INF)
    if amount <= 0:
        return Take(0.0, at, rate)
    return None


class TokenBucket:
    """Go's ``rate.Limiter`` on explicit time, plus a pause.

    ``tokens`` may be negative: that is the debt of reservations that act in the future, which is
    how waiters queue without polling. A clock that goes backwards adds no tokens (Go's rule:
    time before ``last`` counts as no time), and unlike Go's, ``last`` never moves back either and a
    wait is counted from it: otherwise a stale reading (a thread preempted between reading the clock
    and taking the lock) would have the refill between the two readings counted twice.
    """

    __slots__ = ("burst", "frozen_total", "frozen_until", "last", "last_event", "lock", "rate", "tokens")

    def __init__(self, rate: float, burst: float, now: float = 0.0, *, tokens: float | None = None) -> None:
        _check(rate, burst)
        self.rate = float(rate)
        self.burst = float(burst)
        self.tokens = self.burst if tokens is None else float(tokens)
        self.last = now
        self.last_event = now
        self.frozen_until = -INF
        self.frozen_total = 0.0
        self.lock = threading.Lock()

    def __repr__(self) -> str:
        return f"TokenBucket(rate={self.rate!r}, burst={self.burst!r}, tokens={self.tokens!r})"

    def _advance(self, now: float) -> float:
        """Tokens at ``now``: refilled since ``last`` (or since the pause ended), capped at the burst."""
        start = self.last if self.last > self.frozen_until else self.frozen_until
        if now <= start or not self.rate:
            return self.tokens
        if self.rate == INF:
            return self.burst
        tokens = self.tokens + (now - start) * self.rate
        return tokens if tokens < self.burst else self.burst

    def _delay(self, now: float, deficit: float) -> float:
        """Seconds from ``now`` until ``deficit`` more tokens exist and no pause holds.

        Refill resumes at the bucket's own time (``last``, or the end of a pause) when ``now`` is earlier.
        """
        if deficit <= 0:
            return self.frozen_until - now if self.frozen_until > now else 0.0
        if not self.rate:
            return INF
        start = self.last if self.last > self.frozen_until else self.frozen_until
        return (start - now if start > now else 0.0) + deficit / self.rate

    def try_take(self, now: float, amount: float) -> bool:
        """Take ``amount`` now if the bucket holds it (no debt, no pause): the hot path, allocation-free.

        Same arithmetic as ``reserve(now, amount, 0)``; False means "ask ``reserve``", not "refused".
        """
        frozen = self.frozen_until
        if now < frozen:
            return False
        last = self.last
        tokens = self.tokens
        if now > last:
            tokens += (now - (last if last > frozen else frozen)) * self.rate
            if tokens > self.burst:
                tokens = self.burst
        if not tokens >= amount:  # also False for NaN (an infinite rate at the same instant)
            return False
        self.tokens = tokens - amount
        if now > self.last:
            self.last = now
        if self.last_event < now:
            self.last_event = now
        return True

    def reserve(self, now: float, amount: float, max_wait: float = INF) -> Take | None:
        if (free := _free_take(self.rate, amount, now)) is not None:
            return free
        if amount > self.burst:
            return None
        tokens = self._advance(now) - amount
        delay = self._delay(now, -tokens)
        if delay > max_wait or delay == INF:
            return None
        self.tokens = tokens
        if now > self.last:
            self.last = now
        act = now + delay
        if act > self.last_event:
            self.last_event = act
        return Take(amount, act, self.rate)

    def wait_for(self, now: float, amount: float) -> float:
        if self.rate == INF or amount <= 0:
            return 0.0
        if amount > self.burst:
            return INF
        return self._delay(now, amount - self._advance(now))

    def cancel(self, now: float, take: Take) -> float:
        # Go's CancelAt: tokens reserved after this one cannot move forward, so only the rest returns.
        if self.rate == INF or take.amount <= 0 or take.time_to_act < now:
            return 0.0
        later = self.last_event - take.time_to_act
        restore = take.amount - later * take.rate if later > 0 else take.amount
        if restore <= 0:
            return 0.0
        before = self._advance(now)
        tokens = min(self.burst, before + restore)
        self.tokens = tokens
        if now > self.last:
            self.last = now
        if take.time_to_act == self.last_event and take.rate > 0:
            previous = take.time_to_act - take.amount / take.rate
            if previous >= now:
                self.last_event = previous
        take.amount = 0.0
        return tokens - before

    def refund(self, now: float, take: Take | None, amount: float) -> None:
        if amount <= 0 or self.rate == INF:
            return
        if take is not None:
            # What is refunded is no longer the take's: a later cancel must not return it again.
            amount = min(amount, take.amount)
            take.amount -= amount
        if take is not None and take.time_to_act >= now:
            # Not acted yet: a partial cancel, by Go's rule (the slots after it belong to those behind it).
            amount -= (self.last_event - take.time_to_act) * self.rate
            if amount <= 0:
                return
        elif self.last_event > now:
            # Acted, with reservations still queued: returning tokens now would let a new reservation act
            # next to a queued one (the burst cap between now and its time is what breaks). Dropped; the
            # policy never queues in a bucket, so its refunds always apply.
            return
        self.tokens = min(self.burst, self._advance(now) + amount)
        if now > self.last:
            self.last = now

    def charge(self, now: float, take: Take | None, amount: float) -> None:
        if amount <= 0 or self.rate == INF:
            return
        if take is not None:
            take.amount += amount
        self.tokens = self._advance(now) - amount
        if now > self.last:
            self.last = now

    def pause(self, now: float, seconds: float) -> float:
        until = now + seconds
        start = self.frozen_until if self.frozen_until > now else now
        if not until > start:
            return 0.0
        # Drain: after a 429 the provider is full, so the pause must not end in a burst.
        tokens = self._advance(now)
        self.tokens = tokens if tokens < 0 else 0.0
        if now > self.last:
            self.last = now
        added = until - start
        self.frozen_until = until
        self.frozen_total += added
        if self.last_event > now:
            self.last_event += added
        return added

    def set_limit(self, now: float, rate: float, burst: float) -> None:
        _check(rate, burst)
        tokens = self._advance(now)
        if now > self.last:
            self.last = now
        self.rate = float(rate)
        self.burst = float(burst)
        self.tokens = tokens if tokens < self.burst else self.burst

    def available(self, now: float) -> float:
        return self._advance(now)


class _Entry(Take):
    __slots__ = ()


class SlidingWindowLog:
    """At most ``burst`` tokens in any window of ``burst / rate`` seconds, from a log of every take.

    Memory grows with the takes in one window (fine for per-minute limits of requests or of tokens
    taken a few thousand at a time). Cancelling gives everything back, even with later reservations
    waiting: they only become more conservative.
    """

    __slots__ = ("burst", "entries", "frozen_total", "frozen_until", "lock", "rate", "total")

    def __init__(self, rate: float, burst: float, now: float = 0.0) -> None:
        _check(rate, burst)
        self.rate = float(rate)
        self.burst = float(burst)
        self.entries: deque[_Entry] = deque()
        #: Sum of ``entries`` amounts, kept so the common case needs no scan.
        self.total = 0.0
        self.frozen_until = -INF
        self.frozen_total = 0.0
        self.lock = threading.Lock()

    def __repr__(self) -> str:
        return f"SlidingWindowLog(rate={self.rate!r}, burst={self.burst!r}, in_window={self.total!r})"

    @property
    def window(self) -> float:
        """Seconds a take counts against the limit: infinite at rate 0 (nothing ever comes back)."""
        if self.rate == INF:
            return 0.0
        return self.burst / self.rate if self.rate else INF

    def _prune(self, now: float) -> None:
        horizon = now - self.window
        entries = self.entries
        while entries and entries[0].time_to_act <= horizon:
            entry = entries.popleft()
            self.total -= entry.amount
            entry.amount = 0.0  # out of the window: nothing left to cancel or refund
        if not entries:
            self.total = 0.0

    def _earliest(self, now: float, amount: float) -> float:
        """The first instant at or after ``now`` (and after every logged take: FIFO) that fits ``amount``."""
        self._prune(now)
        start = now if now > self.frozen_until else self.frozen_until
        if self.entries and self.entries[-1].time_to_act > start:
            start = self.entries[-1].time_to_act
        window = self.window
        total = self.total
        if total + amount <= self.burst:
            return start
        for entry in self.entries:
            if entry.time_to_act + window > start:
                start = entry.time_to_act + window
            total -= entry.amount
            if total + amount <= self.burst:
                return start
        return start

    def reserve(self, now: float, amount: float, max_wait: float = INF) -> Take | None:
        if (free := _free_take(self.rate, amount, now)) is not None:
            return free
        if amount > self.burst:
            return None
        when = self._earliest(now, amount)
        if when == INF or when - now > max_wait:
            return None
        entry = _Entry(amount, when, self.rate)
        self.entries.append(entry)
        self.total += amount
        return entry

    def wait_for(self, now: float, amount: float) -> float:
        if self.rate == INF or amount <= 0:
            return 0.0
        if amount > self.burst:
            return INF
        return self._earliest(now, amount) - now

    def try_take(self, now: float, amount: float) -> bool:
        """Never taken here: a log must record each take, so ``reserve`` does it."""
        return False

    def cancel(self, now: float, take: Take) -> float:
        if self.rate == INF or take.amount <= 0 or take.time_to_act < now:
            return 0.0
        returned = take.amount
        self.total -= returned
        take.amount = 0.0
        return returned

    def refund(self, now: float, take: Take | None, amount: float) -> None:
        if take is None or self.rate == INF or amount <= 0:
            return
        amount = min(amount, take.amount)
        take.amount -= amount
        self.total -= amount

    def charge(self, now: float, take: Take | None, amount: float) -> None:
        if self.rate == INF or amount <= 0:
            return
        if take is not None and take in self.entries:
            take.amount += amount
        else:
            self.entries.append(_Entry(amount, max(now, self.entries[-1].time_to_act) if self.entries else now,
                                       self.rate))
        self.total += amount

    def pause(self, now: float, seconds: float) -> float:
        until = now + seconds
        start = self.frozen_until if self.frozen_until > now else now
        if not until > start:
            return 0.0
        added = until - start
        self.frozen_until = until
        self.frozen_total += added
        for entry in self.entries:
            if entry.time_to_act > now:
                entry.time_to_act += added
        return added

    def set_limit(self, now: float, rate: float, burst: float) -> None:
        _check(rate, burst)
        self.rate = float(rate)
        self.burst = float(burst)

    def available(self, now: float) -> float:
        if self.rate == INF:
            return self.burst
        self._prune(now)
        return self.burst - self.total


def make_algorithm(name: AlgorithmName, rate: float, burst: float, now: float = 0.0) -> TokenBucket | SlidingWindowLog:
    if name == "token_bucket":
        return TokenBucket(rate, burst, now)
    if name == "sliding_window":
        return SlidingWindowLog(rate, burst, now)
    raise ValueError(f"unknown rate-limit algorithm {name!r}; use one of {', '.join(ALGORITHMS)}")
