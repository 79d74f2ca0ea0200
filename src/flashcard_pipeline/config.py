"""Settings read from the environment (the plan's variable names), validated once at the edge.

This is the only module that reads the environment for settings: everything below it (the resilience engine,
the cache, the database) takes the plain objects made here, so building one in code never depends on the
shell it runs in.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal, TypeVar, cast

from pydantic import BaseModel, ConfigDict, Field
from pydantic import ValidationError as PydanticValidationError
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from flashcard_pipeline.errors import ConfigurationError, ErrorCategory
from flashcard_pipeline.resilience import CircuitBreakerConfig, RateLimitSettings, RetryConfig
from flashcard_pipeline.resilience.breaker.config import DEFAULT_FAILURE_CATEGORIES

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


class RetrySettings(BaseSettings, RetryConfig):
    """RETRY_MAX_ATTEMPTS, RETRY_INITIAL_DELAY, RETRY_MAX_DELAY, RETRY_JITTER_ENABLED, ... (every RetryConfig field)."""

    model_config = SettingsConfigDict(env_prefix="RETRY_", extra="ignore", frozen=True)


class CircuitBreakerSettings(BaseSettings, CircuitBreakerConfig):
    """CB_FAILURE_RATIO, CB_MIN_THROUGHPUT, CB_BREAK_DURATION, CB_MAX_WAIT, ... (every CircuitBreakerConfig field)."""

    model_config = SettingsConfigDict(env_prefix="CB_", extra="ignore", frozen=True)

    #: ``external_service,network`` or a JSON list, not pydantic-settings' JSON-only decoding.
    failure_categories: Annotated[frozenset[ErrorCategory], NoDecode] = DEFAULT_FAILURE_CATEGORIES


class RateLimitEnvironment(BaseSettings, RateLimitSettings):
    """RL_REQUESTS_PER_MINUTE, RL_TOKENS_PER_MINUTE, RL_SHARDS, RL_BACKEND, ... (every RateLimitSettings field)."""

    model_config = SettingsConfigDict(env_prefix="RL_", extra="ignore", frozen=True)


def retry_config() -> RetryConfig:
    """Defaults overridden by the ``RETRY_<FIELD>`` variables; a bad value is a :class:`ConfigurationError`."""
    return RetryConfig.model_validate(read_settings(RetrySettings).model_dump())


def breaker_config() -> CircuitBreakerConfig:
    """Defaults overridden by the ``CB_<FIELD>`` variables; a bad value is a :class:`ConfigurationError`."""
    return CircuitBreakerConfig.model_validate(read_settings(CircuitBreakerSettings).model_dump())


def rate_limit_settings(*, rpm: float | None = None, tpm: float | None = None) -> RateLimitSettings:
    """``RL_*`` from the environment, with explicit per-minute limits (``--rpm`` / ``--tpm``) winning; a bad
    value is a usage error."""
    for flag, value in (("--rpm", rpm), ("--tpm", tpm)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ConfigurationError(f"{flag} must be a positive number per minute, got {value!r}")
    settings = RateLimitSettings.model_validate(read_settings(RateLimitEnvironment).model_dump())
    updates = {k: v for k, v in (("requests_per_minute", rpm), ("tokens_per_minute", tpm)) if v is not None}
    return settings.model_copy(update=updates) if updates else settings


TelemetryMode = Literal["off", "otlp", "console"]
SignalExporter = Literal["otlp", "console", "none"]
OtlpProtocol = Literal["http/protobuf", "grpc"]
ExemplarFilter = Literal["always_off", "always_on", "trace_based"]


class TelemetrySettings(BaseModel):
    """What telemetry a run exports (plain; ``telemetry_settings()`` reads it from flags and the environment).

    ``mode`` is the one switch; each signal's exporter defaults to it. The SDK itself reads the rest of the
    standard variables (endpoint, headers, timeouts, service name, resource attributes, sampler, batching)."""

    model_config = ConfigDict(frozen=True)

    mode: TelemetryMode = "off"
    traces: SignalExporter = "none"
    metrics: SignalExporter = "none"
    traces_protocol: OtlpProtocol = "http/protobuf"
    metrics_protocol: OtlpProtocol = "http/protobuf"
    #: Serve the metrics for Prometheus to scrape on this port (0: any free one).
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    metrics_host: str = "127.0.0.1"
    #: Put prompts and answers on attempt spans (GenAI ``gen_ai.input.messages`` / ``gen_ai.output.messages``).
    capture_content: bool = False
    #: OTEL_METRICS_EXEMPLAR_FILTER; ours defaults to off (the SDK's trace_based doubles each measurement's cost).
    exemplar_filter: ExemplarFilter = "always_off"

    @property
    def enabled(self) -> bool:
        """Whether anything is exported; when not, a run never imports OpenTelemetry."""
        return self.traces != "none" or self.metrics != "none" or self.metrics_port is not None


class FlashcardTelemetryEnvironment(BaseSettings):
    """FLASHCARD_TELEMETRY, FLASHCARD_METRICS_PORT, FLASHCARD_METRICS_HOST, FLASHCARD_TRACE_CONTENT."""

    model_config = SettingsConfigDict(env_prefix="FLASHCARD_", extra="ignore", frozen=True)

    telemetry: TelemetryMode = "off"
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    metrics_host: str = "127.0.0.1"
    trace_content: bool = False


class OtelEnvironment(BaseSettings):
    """The standard OTEL_* variables that choose exporters (the SDK reads the others itself)."""

    model_config = SettingsConfigDict(env_prefix="OTEL_", extra="ignore", frozen=True)

    sdk_disabled: bool = False
    traces_exporter: SignalExporter | None = None
    metrics_exporter: SignalExporter | None = None
    exporter_otlp_protocol: OtlpProtocol = "http/protobuf"
    exporter_otlp_traces_protocol: OtlpProtocol | None = None
    exporter_otlp_metrics_protocol: OtlpProtocol | None = None
    instrumentation_genai_capture_message_content: bool = False
    metrics_exemplar_filter: ExemplarFilter = "always_off"


def telemetry_settings(*, mode: str | None = None, metrics_port: int | None = None,
                       capture_content: bool | None = None) -> TelemetrySettings:
    """``--telemetry`` (else FLASHCARD_TELEMETRY, else off), ``--metrics-port``, ``--trace-content``, and the
    OTEL_* variables that pick exporters: OTEL_SDK_DISABLED=true turns everything off, OTEL_TRACES_EXPORTER /
    OTEL_METRICS_EXPORTER (otlp, console or none) override the switch for one signal, OTEL_EXPORTER_OTLP_PROTOCOL
    (and its per-signal forms) choose http/protobuf or grpc. A value the SDK could not honour is a usage error
    rather than silently ignored."""
    own = read_settings(FlashcardTelemetryEnvironment)
    chosen = mode or own.telemetry
    if chosen not in ("off", "otlp", "console"):
        raise ConfigurationError(f"--telemetry must be off, otlp or console, got {chosen!r}")
    port = metrics_port if metrics_port is not None else own.metrics_port
    if chosen == "off" and port is None:
        return TelemetrySettings()  # the OTEL_* variables of other programs are not ours to judge
    otel = read_settings(OtelEnvironment)
    if otel.sdk_disabled:
        return TelemetrySettings()
    signal = cast(SignalExporter, "none" if chosen == "off" else chosen)
    on = chosen != "off"
    return TelemetrySettings(
        mode=cast(TelemetryMode, chosen),
        traces=otel.traces_exporter if on and otel.traces_exporter is not None else signal,
        metrics=otel.metrics_exporter if on and otel.metrics_exporter is not None else signal,
        traces_protocol=otel.exporter_otlp_traces_protocol or otel.exporter_otlp_protocol,
        metrics_protocol=otel.exporter_otlp_metrics_protocol or otel.exporter_otlp_protocol,
        metrics_port=port, metrics_host=own.metrics_host, exemplar_filter=otel.metrics_exemplar_filter,
        capture_content=capture_content if capture_content is not None
        else own.trace_content or otel.instrumentation_genai_capture_message_content)
