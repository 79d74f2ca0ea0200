"""Settings read from the environment (the plan's variable names) and the config file, validated once at the edge.

Precedence, strongest first: a command-line flag (applied by the command), the environment, the config files
(``./flashcard-pipeline.toml``, then ``$XDG_CONFIG_HOME/flashcard-pipeline/flashcard-pipeline.toml``; or only
``$FLASHCARD_CONFIG``), the defaults. A file holds one TOML table per settings class (``[retry]``,
``[rate_limit]``, ...) whose keys are the field names: ``RETRY_MAX_ATTEMPTS`` is ``[retry] max_attempts``.

This is the only module that reads the environment and the files for settings: everything below it (the
resilience engine, the cache, the database) takes the plain objects made here, so building one in code never
depends on the shell it runs in.
"""

from __future__ import annotations

import difflib
import logging
import math
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, TypeVar, cast

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic import ValidationError as PydanticValidationError
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from flashcard_pipeline.config_files import CONFIG_FILE_ENV as CONFIG_FILE_ENV
from flashcard_pipeline.config_files import CONFIG_FILE_NAME as CONFIG_FILE_NAME
from flashcard_pipeline.config_files import config_files as config_files
from flashcard_pipeline.config_files import data_directory as data_directory
from flashcard_pipeline.config_files import read_config_file as read_config_file
from flashcard_pipeline.config_files import user_config_file as user_config_file
from flashcard_pipeline.config_files import using_config_files as using_config_files
from flashcard_pipeline.errors import ConfigurationError, ErrorCategory
from flashcard_pipeline.logging_config import LogOptions, RunLogOptions, console_options, parse_level, parse_levels
from flashcard_pipeline.recovery import RecoveryPlan, parse_strategies
from flashcard_pipeline.resilience import CircuitBreakerConfig, RateLimitSettings, RetryConfig
from flashcard_pipeline.resilience.breaker.config import DEFAULT_FAILURE_CATEGORIES

S = TypeVar("S", bound=BaseSettings)

def config_file_problems(path: Path, document: Mapping[str, Any] | None = None) -> list[str]:
    """Every section or key of the file that no setting has (a typo would otherwise be ignored in silence)."""
    document = read_config_file(path) if document is None else document
    sections = {cls.config_section: cls for cls in SETTINGS}
    problems = []
    for name, table in document.items():
        if name not in sections:
            problems.append(f"{path}: unknown section [{name}]{_did_you_mean(name, sections)}; the sections are "
                            + ", ".join(f"[{s}]" for s in sections))
            continue
        if not isinstance(table, dict):
            problems.append(f"{path}: [{name}] must be a table of settings, not a value")
            continue
        fields = sections[name].model_fields
        problems.extend(f"{path}: unknown setting [{name}] {key}{_did_you_mean(key, fields)}"
                        for key in table if key not in fields)
    return problems


def _did_you_mean(word: str, choices: Mapping[str, Any]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


class ConfigFileSource(TomlConfigSettingsSource):
    """pydantic-settings' TOML source, reading the class's own table of every config file in effect (the
    strongest file's value of a key wins)."""

    def __init__(self, settings_cls: type[BaseSettings]) -> None:
        self.section = getattr(settings_cls, "config_section", "")
        super().__init__(settings_cls, toml_file=list(reversed(config_files())))  # later files override earlier

    def _read_file(self, file_path: Any) -> dict[str, Any]:
        table = read_config_file(Path(file_path)).get(self.section)
        return dict(table) if isinstance(table, dict) else {}


class FileSettings(BaseSettings):
    """Settings that come from the environment, else the config files, else the defaults."""

    #: The TOML table that holds this class's settings.
    config_section: ClassVar[str] = ""

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource,
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, dotenv_settings, file_secret_settings, ConfigFileSource(settings_cls)


def read_settings(cls: type[S]) -> S:
    """``cls()`` from the environment and the config files; a bad value becomes a one-line
    :class:`ConfigurationError` that names where it came from (``invalid DB_POOL_SIZE: Input should be a valid
    integer``, or ``invalid [database] pool_size in ./flashcard-pipeline.toml: ...``) instead of pydantic's
    report. A key in a config file that no setting has is refused the same way."""
    for path in config_files():
        if problems := config_file_problems(path):
            raise ConfigurationError(problems[0])
    try:
        return cls()
    except (PydanticValidationError, ValueError) as exc:
        raise ConfigurationError(f"invalid {settings_problems(cls, exc)[0]}") from exc


def env_name(cls: type[BaseSettings], field: str) -> str:
    """The environment variable of a setting: ``RETRY_MAX_ATTEMPTS`` for RetrySettings' ``max_attempts``."""
    return f"{cls.model_config.get('env_prefix', '')}{field}".upper()


def setting_source(cls: type[BaseSettings], field: str) -> str:
    """Where a setting's value comes from: ``env RETRY_MAX_ATTEMPTS``, ``file ./flashcard-pipeline.toml`` or
    ``default``."""
    name = env_name(cls, field)
    if any(key.upper() == name for key in os.environ):
        return f"env {name}"
    section = getattr(cls, "config_section", "")
    for path in config_files():
        table = read_config_file(path).get(section)
        if isinstance(table, dict) and field in table:
            return f"file {path}"
    return "default"


def setting_location(cls: type[BaseSettings], field: str) -> str:
    """What to name in a message about a setting's value: its variable, or its key and file."""
    source = setting_source(cls, field)
    if source.startswith("file "):
        return f"[{getattr(cls, 'config_section', '')}] {field} in {source.removeprefix('file ')}"
    return env_name(cls, field)


def settings_problems(cls: type[BaseSettings], exc: Exception) -> list[str]:
    """``WHERE: message`` for every problem of a settings validation error, each naming the variable or the
    file key that gave the bad value."""
    if isinstance(exc, PydanticValidationError) and exc.errors():
        found = []
        for error in exc.errors():
            field = str(error["loc"][0]) if error["loc"] else ""  # deeper parts name union members
            message = str(error["msg"]).removeprefix("Value error, ")
            found.append(f"{setting_location(cls, field)}: {message}" if field else f"{env_name(cls, '*')}: {message}")
        return found
    return [f"{env_name(cls, '*')}: {exc}"]


class GeneralSettings(FileSettings):
    """FLASHCARD_DATABASE_URL and FLASHCARD_MODEL_KIND: where runs are stored, and how models are addressed."""

    model_config = SettingsConfigDict(env_prefix="FLASHCARD_", extra="ignore", frozen=True)
    config_section: ClassVar[str] = "general"

    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL or SQLite file of the ledger and cache (process --db wins); "
                                  "unset: $XDG_DATA_HOME/flashcard-pipeline/flashcards.db")
    model_kind: Literal["auto", "chat", "reasoning"] = Field(
        default="auto", description="how to address the model (process --model-kind wins): auto tells reasoning "
                                    "models by their name")

    @field_validator("model_kind", mode="before")
    @classmethod
    def _any_case(cls, value: Any) -> Any:
        return (value.strip().lower() or "auto") if isinstance(value, str) else value


class KeySettings(FileSettings):
    """OPENROUTER_API_KEY and OPENAI_API_KEY (``--api-key`` wins). In a config file they are refused nowhere, but a
    file that holds one and that others may read gets a warning (``chmod 600``)."""

    model_config = SettingsConfigDict(env_prefix="", extra="ignore", frozen=True)
    config_section: ClassVar[str] = "keys"

    openrouter_api_key: SecretStr | None = Field(default=None, description="key for --provider openrouter")
    openai_api_key: SecretStr | None = Field(default=None, description="key for --provider openai-compatible "
                                                                         "(optional for local servers)")

    def key_for(self, provider: str) -> str | None:
        secret = {"openrouter": self.openrouter_api_key, "openai-compatible": self.openai_api_key}.get(provider)
        return secret.get_secret_value() if secret is not None else None


class DatabaseSettings(FileSettings):
    """Connection pool settings: DB_POOL_SIZE, DB_MAX_OVERFLOW, DB_POOL_RECYCLE, DB_POOL_TIMEOUT, DB_POOL_PRE_PING."""

    model_config = SettingsConfigDict(env_prefix="DB_", extra="ignore", frozen=True)
    config_section: ClassVar[str] = "database"

    pool_size: int = Field(default=20, ge=1, le=1000)
    max_overflow: int = Field(default=40, ge=0, le=1000)
    pool_recycle: int = Field(default=3600, ge=-1, description="seconds before a connection is replaced; -1 never")
    pool_timeout: float = Field(default=30.0, gt=0, description="seconds to wait for a free connection")
    pool_pre_ping: bool = True


class CacheSettings(FileSettings):
    """CACHE_COMPRESSION_ENABLED, CACHE_COMPRESSION_LEVEL, CACHE_COMPRESSION_MIN_BYTES, CACHE_TTL_JITTER, ..."""

    model_config = SettingsConfigDict(env_prefix="CACHE_", extra="ignore", frozen=True)
    config_section: ClassVar[str] = "cache"

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


class RetrySettings(FileSettings, RetryConfig):
    """RETRY_MAX_ATTEMPTS, RETRY_INITIAL_DELAY, RETRY_MAX_DELAY, ... (every RetryConfig field)."""

    model_config = SettingsConfigDict(env_prefix="RETRY_", extra="ignore", frozen=True)
    config_section: ClassVar[str] = "retry"


class CircuitBreakerSettings(FileSettings, CircuitBreakerConfig):
    """CB_FAILURE_RATIO, CB_MIN_THROUGHPUT, CB_BREAK_DURATION, CB_MAX_WAIT, ... (every CircuitBreakerConfig field)."""

    model_config = SettingsConfigDict(env_prefix="CB_", extra="ignore", frozen=True)
    config_section: ClassVar[str] = "circuit_breaker"

    #: ``external_service,network`` or a JSON list, not pydantic-settings' JSON-only decoding.
    failure_categories: Annotated[frozenset[ErrorCategory], NoDecode] = DEFAULT_FAILURE_CATEGORIES


class RateLimitEnvironment(FileSettings, RateLimitSettings):
    """RL_REQUESTS_PER_MINUTE, RL_TOKENS_PER_MINUTE, RL_SHARDS, RL_BACKEND, ... (every RateLimitSettings field)."""

    model_config = SettingsConfigDict(env_prefix="RL_", extra="ignore", frozen=True)
    config_section: ClassVar[str] = "rate_limit"


def retry_config() -> RetryConfig:
    """Defaults overridden by ``RETRY_<FIELD>`` or ``[retry]``; a bad value is a :class:`ConfigurationError`."""
    return RetryConfig.model_validate(read_settings(RetrySettings).model_dump())


def breaker_config() -> CircuitBreakerConfig:
    """Defaults overridden by ``CB_<FIELD>`` or ``[circuit_breaker]``; a bad value is a :class:`ConfigurationError`."""
    return CircuitBreakerConfig.model_validate(read_settings(CircuitBreakerSettings).model_dump())


def rate_limit_settings(*, rpm: float | None = None, tpm: float | None = None) -> RateLimitSettings:
    """``RL_*`` / ``[rate_limit]``, with explicit per-minute limits (``--rpm`` / ``--tpm``) winning; a bad value is
    a usage error."""
    for flag, value in (("--rpm", rpm), ("--tpm", tpm)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ConfigurationError(f"{flag} must be a positive number per minute, got {value!r}")
    settings = RateLimitSettings.model_validate(read_settings(RateLimitEnvironment).model_dump())
    updates = {k: v for k, v in (("requests_per_minute", rpm), ("tokens_per_minute", tpm)) if v is not None}
    return settings.model_copy(update=updates) if updates else settings


def _comma_list(value: Any) -> Any:
    """``a,b`` (or a JSON list, or a TOML array) -> a tuple of the non-empty trimmed names."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            import json

            value = json.loads(text)
        else:
            value = text.split(",")
    if isinstance(value, list | tuple):
        return tuple(str(v).strip() for v in value if str(v).strip())
    return value


class LogSettings(FileSettings):
    """LOG_LEVEL, LOG_FORMAT, LOG_LEVELS, LOG_FILE, LOG_DIR, ...: what the console and each run's log file get."""

    model_config = SettingsConfigDict(env_prefix="LOG_", extra="ignore", frozen=True)
    config_section: ClassVar[str] = "logging"

    level: str = Field(default="WARNING", description="console level: DEBUG, INFO, WARNING, ERROR (-v is INFO, -vv "
                                                      "DEBUG, -q ERROR; --log-level wins)")
    format: Literal["text", "json"] = Field(default="text", description="console lines: text, or json (one object "
                                                                        "per line; --log-format wins)")
    levels: str = Field(default="", description="per-module levels for the console and the file: "
                                                "flashcard_pipeline.resilience=DEBUG,httpx=INFO")
    file: bool = Field(default=True, description="write each run's lines, as JSON, to a file of its own in LOG_DIR "
                                                 "(`logs` reads it)")
    file_level: str = Field(default="INFO", description="level of the run log file")
    dir: Path | None = Field(default=None, description="where run log files go; unset: "
                                                      "$XDG_DATA_HOME/flashcard-pipeline/logs")
    max_bytes: int = Field(default=10 * 1024 * 1024, ge=1024, description="a run log file is rotated at this size")
    backups: int = Field(default=5, ge=0, le=100, description="rotated files kept per run log")

    @field_validator("level", "file_level")
    @classmethod
    def _level(cls, value: str) -> str:
        return logging.getLevelName(parse_level(value, "level"))

    @field_validator("levels")
    @classmethod
    def _levels(cls, value: str) -> str:
        parse_levels(value, "levels")
        return value

    @field_validator("format", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value


class RecoverySettings(FileSettings):
    """RECOVERY_STRATEGIES, RECOVERY_FALLBACK_MODELS, ...: what happens to a failure beyond retrying it."""

    model_config = SettingsConfigDict(env_prefix="RECOVERY_", extra="ignore", frozen=True)
    config_section: ClassVar[str] = "recovery"

    strategies: str = Field(
        default="", description="changes to the registry: CODE_OR_CATEGORY=STRATEGY[+STRATEGY],... with "
                                "reask_with_errors, larger_budget, fallback_model, quarantine or none")
    fallback_models: Annotated[tuple[str, ...], NoDecode] = Field(
        default=(), description="models that take an item over when the run's model cannot answer it, in order "
                                "(comma list; process --fallback-model wins)")
    budget_factor: float = Field(default=2.0, gt=1.0, le=16.0, description="larger_budget multiplies the "
                                                                          "prompt's max_tokens by this, once")
    max_output_tokens: int = Field(default=16384, ge=1, description="larger_budget never asks for more")

    @field_validator("strategies")
    @classmethod
    def _strategies(cls, value: str) -> str:
        parse_strategies(value)
        return value

    @field_validator("fallback_models", mode="before")
    @classmethod
    def _models(cls, value: Any) -> Any:
        return _comma_list(value)


def recovery_plan(fallback_models: list[str] | None = None) -> RecoveryPlan:
    """The registry from ``RECOVERY_*`` / ``[recovery]``; ``--fallback-model`` (repeatable) replaces the chain."""
    settings = read_settings(RecoverySettings)
    models = tuple(fallback_models) if fallback_models else settings.fallback_models
    return RecoveryPlan.with_overrides(parse_strategies(settings.strategies), fallback_models=models,
                                       budget_factor=settings.budget_factor,
                                       max_output_tokens=settings.max_output_tokens)


def log_options(*, level: str | None = None, format: str | None = None, verbosity: int = 0) -> LogOptions:
    """The console's logging: ``--log-level``, else ``-v``/``-q`` (verbosity 1, 2 or -1), else ``LOG_LEVEL``;
    ``--log-format``, else ``LOG_FORMAT``. Keys in effect are redacted from every line."""
    settings = read_settings(LogSettings)
    return console_options(level=level, format=format, verbosity=verbosity, setting_level=settings.level,
                           setting_format=settings.format, setting_levels=settings.levels, secrets=_secrets())


def run_log_options() -> RunLogOptions | None:
    """Each run's own log file, or None with ``LOG_FILE=false``."""
    settings = read_settings(LogSettings)
    if not settings.file:
        return None
    return RunLogOptions(directory=settings.dir or data_directory() / "logs", level=parse_level(settings.file_level),
                         levels=parse_levels(settings.levels), max_bytes=settings.max_bytes,
                         backups=settings.backups, secrets=_secrets())


class WorkerSettings(FileSettings):
    """WORKER_LEASE_SECONDS, WORKER_HEARTBEAT_INTERVAL, WORKER_POLL_INTERVAL: how `worker` processes share a run."""

    model_config = SettingsConfigDict(env_prefix="WORKER_", extra="ignore", frozen=True)
    config_section: ClassVar[str] = "worker"

    lease_seconds: float = Field(
        default=60.0, ge=1.0, le=3600.0, description="seconds a worker holds the items it took without a heartbeat; "
                                                      "a dead worker's items go to the others this long after its "
                                                      "last heartbeat (worker --lease wins)")
    heartbeat_interval: float = Field(
        default=10.0, gt=0.0, le=600.0, description="seconds between two heartbeats of a worker (renewing its "
                                                    "leases); keep it well under the lease")
    poll_interval: float = Field(
        default=2.0, gt=0.0, le=600.0, description="seconds an idle worker waits before it looks again for items "
                                                   "to take (others hold the rest, or their leases have not "
                                                   "expired yet)")

    @model_validator(mode="after")
    def _heartbeat_within_lease(self) -> WorkerSettings:
        if self.heartbeat_interval >= self.lease_seconds:
            raise ValueError(f"WORKER_HEARTBEAT_INTERVAL ({self.heartbeat_interval:g}) must be shorter than "
                             f"WORKER_LEASE_SECONDS ({self.lease_seconds:g}), or live workers lose their items")
        return self


def _secrets() -> tuple[str, ...]:
    keys = read_settings(KeySettings)
    return tuple(s.get_secret_value() for s in (keys.openrouter_api_key, keys.openai_api_key) if s is not None)


#: Every settings class, in the order `config show`, `config init` and docs/settings.md list them.
SETTINGS: tuple[type[FileSettings], ...] = (GeneralSettings, KeySettings, DatabaseSettings, CacheSettings,
                                            RetrySettings, CircuitBreakerSettings, RateLimitEnvironment,
                                            RecoverySettings, LogSettings, WorkerSettings)


def loose_key_files() -> list[Path]:
    """Config files in effect that hold an API key and that others than their owner may read."""
    found = []
    for path in config_files():
        keys = read_config_file(path).get(KeySettings.config_section)
        if isinstance(keys, dict) and any(keys.get(field) for field in KeySettings.model_fields) \
                and path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            found.append(path)
    return found


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
