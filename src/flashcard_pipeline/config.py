"""Settings read from the environment (the plan's variable names), validated once at the edge."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


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
