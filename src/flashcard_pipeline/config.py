"""Settings read from the environment (the plan's variable names), validated once at the edge."""

from __future__ import annotations

from typing import Annotated, Literal, TypeVar

from pydantic import Field
from pydantic import ValidationError as PydanticValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from flashcard_pipeline.errors import ConfigurationError
from flashcard_pipeline.resilience.circuit_breaker import CircuitBreakerConfig

S = TypeVar("S", bound=BaseSettings)


def read_settings(cls: type[S]) -> S:
    """``cls()`` from the environment; a bad value becomes a one-line :class:`ConfigurationError` that names
    the variable (``invalid DB_POOL_SIZE: Input should be a valid integer``) instead of pydantic's report."""
    try:
        return cls()
    except (PydanticValidationError, ValueError) as exc:
        raise ConfigurationError(f"invalid {settings_problem(exc, str(cls.model_config.get('env_prefix', '')))}") \
            from exc


def settings_problem(exc: Exception, prefix: str) -> str:
    """``PREFIX_FIELD: message`` for the first problem of a settings validation error."""
    if isinstance(exc, PydanticValidationError) and exc.errors():
        first = exc.errors()[0]
        where = str(first["loc"][0]).upper() if first["loc"] else ""  # the field; deeper parts name union members
        message = str(first["msg"]).removeprefix("Value error, ")
        return f"{prefix}{where}: {message}" if where else f"{prefix}*: {message}"
    return f"{prefix}*: {exc}"


class DatabaseSettings(BaseSettings):
    """Connection pool settings: DB_POOL_SIZE, DB_MAX_OVERFLOW, DB_POOL_RECYCLE, DB_POOL_TIMEOUT, DB_POOL_PRE_PING."""

    model_config = SettingsConfigDict(env_prefix="DB_", extra="ignore", frozen=True)

    pool_size: int = Field(default=20, ge=1, le=1000)
    max_overflow: int = Field(default=40, ge=0, le=1000)
    pool_recycle: int = Field(default=3600, ge=-1, description="seconds before a connection is replaced; -1 never")
    pool_timeout: float = Field(default=30.0, gt=0, description="seconds to wait for a free connection")
    pool_pre_ping: bool = True


class CacheSettings(BaseSettings):
    """CACHE_COMPRESSION_ENABLED, CACHE_COMPRESSION_LEVEL, CACHE_COMPRESSION_MIN_BYTES, CACHE_TTL_JITTER, ..."""

    model_config = SettingsConfigDict(env_prefix="CACHE_", extra="ignore", frozen=True)

    compression_enabled: bool = True
    compression_level: int = Field(default=6, ge=1, le=9)
    compression_min_bytes: int = Field(
        default=256, ge=0,
        description="smaller values are stored as they are; with the preset dictionary even short answers shrink")
    compression_dictionary: bool = True
    ttl_jitter: float = Field(default=0.1, ge=0.0, lt=1.0, description="TTLs vary by ±this share against stampedes")
    ttl_nuance: float | None = Field(default=None, gt=0, description="seconds; unset: paid answers never expire")
    ttl_cards: float | None = Field(default=None, gt=0)
    memory_entries: int = Field(default=2048, ge=0, description="size of the in-process LRU in front of the backend")
    backend: Literal["database", "redis"] = "database"
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_prefix: str = "flashcard-pipeline:cache:"

    def ttl_for(self, cache_type: str) -> float | None:
        return {"nuance": self.ttl_nuance, "cards": self.ttl_cards}.get(cache_type)


class CircuitBreakerSettings(BaseSettings, CircuitBreakerConfig):
    """CB_FAILURE_RATIO, CB_MIN_THROUGHPUT, CB_BREAK_DURATION, CB_MAX_WAIT, ... (every CircuitBreakerConfig field)."""

    model_config = SettingsConfigDict(env_prefix="CB_", extra="ignore", frozen=True)


class RateLimitSettings(BaseSettings):
    """RL_REQUESTS_PER_MINUTE, RL_TOKENS_PER_MINUTE, RL_ALGORITHM, RL_SHARDS, RL_BACKEND, ... (see docs/operations.md).

    An unset per-minute limit is unknown. The requests limit is then found adaptively from
    ``initial_requests_per_minute`` and cut on 429s. An unknown tokens limit stays unlimited: a 429
    never lowers it; only ``tokens_per_minute`` (``--tpm``) or an ``x-ratelimit-limit-tokens`` header
    sets it. Tokens are bounded all the same by the requests rate, since every call has a bounded size
    (prompt estimate plus ``max_tokens``).
    """

    model_config = SettingsConfigDict(env_prefix="RL_", extra="ignore", frozen=True)

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
    increase_step: float = Field(default=0.02, gt=0, description="raise after a 429 while below the level the "
                                                                  "provider accepted, times that level")
    settle_step: float = Field(default=0.002, gt=0, description="raise above that level, times that level")
    min_per_minute: float = Field(default=1.0, gt=0)
    default_pause: float = Field(default=1.0, ge=0, description="pause after a 429 without Retry-After")
    max_pause: float = Field(default=120.0, gt=0)
    reservation_ttl: float = Field(default=60.0, gt=0)
    publish_interval: float = Field(default=2.0, gt=0, description="seconds between published snapshots")
