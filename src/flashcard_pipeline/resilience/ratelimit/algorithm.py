"""The interface every rate-limit algorithm implements, on explicit time, and what a take holds."""

from __future__ import annotations

import math
import threading
from typing import Literal, Protocol

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


def check_rate_and_burst(rate: float, burst: float) -> None:
    if math.isnan(rate) or rate < 0:
        raise ValueError(f"rate must be >= 0 (inf for no limit), got {rate!r}")
    if not math.isfinite(burst) or burst < 0:
        raise ValueError(f"burst must be a finite number >= 0, got {burst!r}")


def free_take(rate: float, amount: float, at: float, paused_until: float = -INF) -> Take | None:
    """What every algorithm grants as it is: any amount from an unlimited limit, nothing from any limit; after a
    pause, though (a 429's Retry-After holds whatever the limits are)."""
    if paused_until > at:
        at = paused_until
    if rate == INF:
        return Take(amount, at, INF)
    if amount <= 0:
        return Take(0.0, at, rate)
    return None
