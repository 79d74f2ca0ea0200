"""The rate limiter's settings as plain data (the ``RL_*`` variables are read by :mod:`flashcard_pipeline.config`)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field


class RateLimitSettings(BaseModel):
    """RL_REQUESTS_PER_MINUTE, RL_TOKENS_PER_MINUTE, RL_ALGORITHM, RL_SHARDS, RL_BACKEND, ... (see docs/operations.md).

    An unset per-minute limit is unknown. The requests limit is then found adaptively from
    ``initial_requests_per_minute`` and cut on 429s. An unknown tokens limit stays unlimited: a 429
    never lowers it; only ``tokens_per_minute`` (``--tpm``) or an ``x-ratelimit-limit-tokens`` header
    sets it. Tokens are bounded all the same by the requests rate, since every call has a bounded size
    (prompt estimate plus ``max_tokens``).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = True
    requests_per_minute: float | None = Field(default=None, gt=0)
    tokens_per_minute: float | None = Field(default=None, gt=0)
    algorithm: Literal["token_bucket", "sliding_window"] = "token_bucket"
    shards: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        default=1, description="buckets for the requests limit (memory backend); 'auto' = max_qps / 2, >= 10 calls "
                               "each; an explicit N needs >= 1 call per shard (checked when the limiter is built)")
    backend: Literal["memory", "redis"] = "memory"
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_prefix: str = "flashcard-pipeline:ratelimit:"
    adaptive: bool = True
    initial_requests_per_minute: float = Field(default=60.0, gt=0)
    safety: float = Field(default=0.985, gt=0, le=1, description="share of a known limit to plan for")
    burst_share: float = Field(default=0.02, gt=0, lt=1, description="bucket size as a share of the limit")
    decrease_factor: float = Field(default=0.5, gt=0, lt=1, description="multiplier after a 429")
    increase_interval: float = Field(default=5.0, gt=0, description="seconds of saturated success per raise")
    probe_step: float = Field(default=1.0, gt=0, description="raise before any 429, times the current limit")
    probe_interval: float = Field(default=1.0, gt=0, description="seconds of saturated success per raise before "
                                                                 "any 429 (slow start)")
    increase_step: float = Field(default=0.02, gt=0, description="raise after a 429 while below the level the "
                                                                  "provider accepted, times that level")
    settle_step: float = Field(default=0.002, gt=0, description="raise above that level, times that level")
    min_per_minute: float = Field(default=1.0, gt=0)
    default_pause: float = Field(default=1.0, ge=0, description="pause after a 429 without Retry-After")
    max_pause: float = Field(default=120.0, gt=0)
    publish_interval: float = Field(default=2.0, gt=0, description="seconds between published snapshots")
