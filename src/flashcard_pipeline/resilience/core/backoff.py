"""Exponential growth without overflow: retry delays and the breaker's break durations both grow this way."""

from __future__ import annotations

import math


def exponential_delay(attempt: int, *, initial: float, base: float, cap: float) -> float:
    """``min(cap, initial * base ** (attempt - 1))`` without overflow for any ``attempt >= 1``."""
    if initial <= 0 or cap <= 0:
        return 0.0
    if attempt <= 1 or base <= 1 or cap <= initial:
        return min(initial, cap)
    exponent = attempt - 1
    # Compare logarithms instead of computing base ** exponent (or cap / initial, infinite for a subnormal
    # initial), either of which overflows.
    if exponent >= (math.log(cap) - math.log(initial)) / math.log(base):
        return cap
    try:
        return min(cap, float(initial) * float(base) ** exponent)
    except OverflowError:  # only reachable with an infinite cap
        return cap
