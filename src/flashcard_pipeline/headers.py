"""Numbers in HTTP headers, read the same way by the client (``Retry-After``) and the rate limiter
(``x-ratelimit-*``): a module of its own so neither depends on the other."""

from __future__ import annotations

import math


def header_number(raw: str | None) -> float | None:
    """A header value as a finite, non-negative number, or None (absent or unparseable)."""
    if raw is None:
        return None
    try:
        value = float(raw.strip())
    except ValueError:
        return None
    return value if math.isfinite(value) and value >= 0 else None
