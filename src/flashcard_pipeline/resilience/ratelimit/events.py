"""What the rate limiter tells the engine's listeners: waits, pauses after 429s, and limit changes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from flashcard_pipeline.resilience.core.events import ResilienceEvent
from flashcard_pipeline.resilience.ratelimit.headers import Dimension


@dataclass(frozen=True)
class LimitWait(ResilienceEvent):
    """A call queued ``seconds`` for its slot; ``dimension`` is the limit that held it last."""

    group: str
    dimension: Dimension
    seconds: float


@dataclass(frozen=True)
class LimitPause(ResilienceEvent):
    """A 429 (or a header saying nothing is left) pauses every caller of ``group`` for ``seconds``."""

    group: str
    seconds: float


LimitCause = Literal["rate_limited", "adaptive", "header"]


@dataclass(frozen=True)
class LimitCut(ResilienceEvent):
    """The planned limit went down (per minute): after a 429, or to what a header reports."""

    group: str
    dimension: Dimension
    before: float
    after: float
    cause: LimitCause


@dataclass(frozen=True)
class LimitRaise(ResilienceEvent):
    """The planned limit went up (per minute): the adaptive increase, or what a header reports."""

    group: str
    dimension: Dimension
    before: float
    after: float
    cause: LimitCause


#: Why a limit is what it is: set by the user, by ``x-ratelimit-*`` headers, found from 429s that answered our
#: rate, held because 429s did not answer it, still growing before any 429, or none at all.
LimitReason = Literal["configured", "headers", "found", "429s are not rate-related", "probing", "unlimited"]


@dataclass(frozen=True)
class LimitStatus(ResilienceEvent):
    """A limit's level and the reason for it, each time either changes (``ratelimit status`` and the progress
    line show it)."""

    group: str
    dimension: Dimension
    planned: float | None
    reason: LimitReason
