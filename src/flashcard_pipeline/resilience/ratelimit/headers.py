"""What a response says about the provider's limits: ``x-ratelimit-*`` headers and their durations."""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from flashcard_pipeline.headers import header_number

Dimension = Literal["requests", "tokens"]


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
