"""A sliding-window log on explicit time: what providers that count "the last minute" enforce."""

from __future__ import annotations

import threading
from collections import deque

from flashcard_pipeline.resilience.ratelimit.algorithm import INF, Take, check_rate_and_burst, free_take


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
        check_rate_and_burst(rate, burst)
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
        if (free := free_take(self.rate, amount, now, self.frozen_until)) is not None:
            return free if free.time_to_act - now <= max_wait else None
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
            return self.frozen_until - now if self.frozen_until > now else 0.0
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
        check_rate_and_burst(rate, burst)
        self.rate = float(rate)
        self.burst = float(burst)

    def available(self, now: float) -> float:
        if self.rate == INF:
            return self.burst
        self._prune(now)
        return self.burst - self.total
