"""Go's ``golang.org/x/time/rate.Limiter`` on explicit time, plus a pause."""

from __future__ import annotations

import threading

from flashcard_pipeline.resilience.ratelimit.algorithm import INF, Take, check_rate_and_burst, free_take


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
        check_rate_and_burst(rate, burst)
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
        if (free := free_take(self.rate, amount, now, self.frozen_until)) is not None:
            return free if free.time_to_act - now <= max_wait else None
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
            return self.frozen_until - now if self.frozen_until > now else 0.0
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
        check_rate_and_burst(rate, burst)
        tokens = self._advance(now)
        if now > self.last:
            self.last = now
        self.rate = float(rate)
        self.burst = float(burst)
        self.tokens = tokens if tokens < self.burst else self.burst

    def available(self, now: float) -> float:
        return self._advance(now)
