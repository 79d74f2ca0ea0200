"""Logging, set up at the command line's edge: levels, text or JSON lines, per-module levels, a file per run, and
the context every line carries (run, call, item, stage, attempt, provider, model; trace and span when a span is on).

Nothing here reads settings: :class:`LogOptions` is plain data the CLI builds from ``-v``/``-q``, ``--log-level``,
``--log-format`` and ``[logging]`` / ``LOG_*`` (see :mod:`flashcard_pipeline.config`). Every line, on the console
and in files, passes :func:`~flashcard_pipeline.redaction.redact_all` last, so an API key never reaches a log.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import sys
import traceback
from collections.abc import Iterable, Iterator, Mapping
from contextvars import ContextVar, Token
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, TextIO

from flashcard_pipeline.errors import ConfigurationError, StructuredError
from flashcard_pipeline.redaction import redact_all

PACKAGE = "flashcard_pipeline"
#: What a line's context holds, in the order it is shown; only the keys set are written.
CONTEXT_FIELDS = ("run_id", "call_id", "item", "stage", "attempt", "provider", "model", "trace_id", "span_id")
#: Loggers that say routine things at INFO (every request, every migration step): quiet unless ``LOG_LEVELS``
#: names them.
QUIET_LOGGERS: Mapping[str, int] = MappingProxyType({
    "httpx": logging.WARNING, "httpcore": logging.WARNING, "alembic": logging.WARNING,
    # SQLAlchemy names a pool's logger after its class: ours lives in the package, and says "Pool disposed".
    "flashcard_pipeline.storage.pool_monitor.MonitoredQueuePool": logging.WARNING})
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

_EMPTY: Mapping[str, Any] = MappingProxyType({})
_CONTEXT: ContextVar[Mapping[str, Any]] = ContextVar("flashcard_log_context", default=_EMPTY)


# --- context ------------------------------------------------------------------------------------------------------


#: Seeded from the system's entropy, again in a forked child (or two workers would repeat each other's ids), and
#: apart from ``random``'s shared generator, which an application or a test may seed.
_CALL_IDS = random.Random()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_CALL_IDS.seed)


def new_call_id() -> str:
    """A short id for one provider attempt: in its log lines, its ``api_calls`` row and its error. 64 random bits
    from a generator of its own, not ``uuid4``, which asks the system for entropy on every call: an id to find a
    call by, not a secret."""
    return f"{_CALL_IDS.getrandbits(64):016x}"


def log_context() -> dict[str, Any]:
    """The context of the running task (and, when OpenTelemetry is in use and a span is active, its ids): what a
    log line, a span or an exported error is tagged with."""
    found = dict(_CONTEXT.get())
    found.update(trace_ids())
    return found


def bind(**fields: Any) -> Token[Mapping[str, Any]]:
    """Add ``fields`` to the running task's context (``None`` removes one) until :func:`unbind` of the token; tasks
    started meanwhile inherit it."""
    merged = {**_CONTEXT.get(), **fields}
    return _CONTEXT.set(MappingProxyType({k: v for k, v in merged.items() if v is not None}))


def unbind(token: Token[Mapping[str, Any]]) -> None:
    _CONTEXT.reset(token)


@contextlib.contextmanager
def bound(**fields: Any) -> Iterator[None]:
    """``fields`` in the context for the block; whatever the block bound without unbinding ends with it."""
    token = bind(**fields)
    try:
        yield
    finally:
        _CONTEXT.reset(token)


def trace_ids() -> dict[str, str]:
    """The active OpenTelemetry span's trace and span ids, if the API is loaded (this never imports it: nobody
    made a span if nobody imported it) and a valid span is current."""
    trace = sys.modules.get("opentelemetry.trace")
    if trace is None:
        return {}
    try:
        context = trace.get_current_span().get_span_context()
    except Exception:  # a half-initialised API must not cost a log line
        return {}
    if not context.is_valid:
        return {}
    return {"trace_id": format(context.trace_id, "032x"), "span_id": format(context.span_id, "016x")}


def _record_context(record: logging.LogRecord) -> dict[str, Any]:
    """The context at the time of the call (handlers run in the caller's task), with ``extra=`` context keys."""
    found = log_context()
    for key in CONTEXT_FIELDS:
        value = record.__dict__.get(key)
        if value is not None:
            found[key] = value
    return {key: found[key] for key in CONTEXT_FIELDS if key in found}


def error_dict(exc: BaseException) -> dict[str, Any]:
    """An exception as a log line's ``error``: a :class:`StructuredError` through its ``to_dict`` (with the call it
    belongs to), anything else as its type, message and traceback."""
    if isinstance(exc, StructuredError):
        return exc.to_dict()
    return {"type": type(exc).__name__, "message": str(exc),
            "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).rstrip()}


# --- formatters ---------------------------------------------------------------------------------------------------


class _Redacting:
    """Redacts the whole formatted line: message, context, extra fields and error alike."""

    secrets: set[str]

    def redacted(self, text: str) -> str:
        return redact_all(text, self.secrets)


def _iso(record: logging.LogRecord) -> str:
    return datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _json_default(value: Any) -> Any:
    if isinstance(value, BaseException):
        return error_dict(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    return str(value)


def structured_formatter(secrets: Iterable[str] = ()) -> logging.Formatter:
    """The plan's ``StructuredFormatter``: one JSON object per line (python-json-logger does the record-to-JSON work:
    every ``extra=`` field becomes a key, odd values are encoded)."""
    from pythonjsonlogger.json import JsonFormatter

    class StructuredFormatter(_Redacting, JsonFormatter):
        """``{"time", "level", "logger", "message", <context>, <extra fields>, "error"}``."""

        def __init__(self) -> None:
            super().__init__(json_default=_json_default, json_ensure_ascii=False,
                             reserved_attrs=[*_RESERVED, *CONTEXT_FIELDS])
            self.secrets = set(secrets)

        def add_fields(self, log_data: dict[str, Any], record: logging.LogRecord,
                       message_dict: dict[str, Any]) -> None:
            message_dict.pop("exc_info", None)
            log_data.update(time=_iso(record), level=record.levelname, logger=record.name,
                            message=record.getMessage())
            log_data.update(_record_context(record))
            super().add_fields(log_data, record, message_dict)
            if record.exc_info and record.exc_info[1] is not None:
                log_data["error"] = error_dict(record.exc_info[1])

        def format(self, record: logging.LogRecord) -> str:
            return self.redacted(super().format(record))

    return StructuredFormatter()


#: LogRecord attributes that are not ``extra=`` fields (python-json-logger's list, plus what we add).
_RESERVED = ("args", "asctime", "created", "exc_info", "exc_text", "filename", "funcName", "levelname", "levelno",
             "lineno", "module", "msecs", "message", "msg", "name", "pathname", "process", "processName",
             "relativeCreated", "stack_info", "thread", "threadName", "taskName")


class TextFormatter(_Redacting, logging.Formatter):
    """``12:00:01.234 WARNING flashcard_pipeline.pipeline: message [run=3 item=학교 stage=nuance call=9f2c...]``;
    a structured error adds ``(category/code)``, anything else its traceback."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self.secrets = set(secrets)

    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.fromtimestamp(record.created).isoformat(sep=" ", timespec="milliseconds")
        line = f"{stamp} {record.levelname:<7} {record.name}: {record.getMessage()}"
        context = _record_context(record)
        if context:
            line += " [" + " ".join(f"{_SHORT.get(k, k)}={v}" for k, v in context.items()) + "]"
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, StructuredError):
            line += f" ({exc.category.value}/{exc.code}: {exc.message})"
        elif exc is not None:
            line += "\n" + self.formatException(record.exc_info)  # type: ignore[arg-type]
        return self.redacted(line)


_SHORT = {"run_id": "run", "call_id": "call", "trace_id": "trace", "span_id": "span"}


# --- handlers and levels ------------------------------------------------------------------------------------------


def parse_level(value: str | int, where: str = "LOG_LEVEL") -> int:
    """``debug``/``INFO``/``20`` -> the logging level; anything else is a ValueError naming ``where``."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    text = str(value).strip().upper()
    if text.isdigit():
        return int(text)
    if text == "WARN":
        text = "WARNING"
    if text not in LEVELS:
        raise ValueError(f"{where}: {value!r} is not a level; use one of {', '.join(LEVELS)}")
    return int(logging.getLevelName(text))


def parse_levels(value: str | Mapping[str, str] | None, where: str = "LOG_LEVELS") -> dict[str, int]:
    """``flashcard_pipeline.resilience=DEBUG,httpx=INFO`` (or a mapping) -> {logger: level}."""
    if not value:
        return {}
    pairs: Iterable[tuple[str, str]]
    if isinstance(value, Mapping):
        pairs = value.items()
    else:
        pairs = []
        for part in (p.strip() for p in value.split(",")):
            if not part:
                continue
            name, sep, level = part.partition("=")
            if not sep or not name.strip():
                raise ValueError(f"{where}: expected LOGGER=LEVEL, got {part!r}")
            pairs.append((name, level))
    return {name.strip(): parse_level(level, f"{where} {name.strip()}") for name, level in pairs}


class ThresholdFilter(logging.Filter):
    """Passes a record at or above the level of its logger's closest configured ancestor (``LOG_LEVELS``), else
    ``default``: per-module levels apply to every output, each output keeping its own default."""

    def __init__(self, default: int, levels: Mapping[str, int]) -> None:
        super().__init__()
        self.default = default
        self.levels = dict(levels)
        self._cache: dict[str, int] = {}

    def threshold(self, name: str) -> int:
        found = self._cache.get(name)
        if found is None:
            probe = name
            while True:
                if probe in self.levels:
                    found = self.levels[probe]
                    break
                if "." not in probe:
                    found = self.default
                    break
                probe = probe.rpartition(".")[0]
            self._cache[name] = found
        return found

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= self.threshold(record.name)


class StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at the time: while Rich's live display runs it is Rich's proxy, which
    prints each line above the display instead of through it."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        pass


@dataclass(frozen=True)
class LogOptions:
    """How this process logs (built by the CLI from flags and ``LOG_*``)."""

    level: int = logging.WARNING
    format: Literal["text", "json"] = "text"
    levels: Mapping[str, int] = field(default_factory=dict)
    #: Secrets to redact besides the key shapes every line is checked for.
    secrets: tuple[str, ...] = ()


def console_options(*, level: str | None, format: str | None, verbosity: int, setting_level: str,
                    setting_format: str, setting_levels: str, secrets: tuple[str, ...]) -> LogOptions:
    """The console's logging: ``--log-level``, else ``-v``/``-q`` (verbosity 1, 2 or -1), else the level setting;
    ``--log-format``, else the format setting. The ``setting_*`` values are validated ``[logging]`` / ``LOG_*``
    ones (the full settings or the quick ones of the status commands: both end here)."""
    if level is not None:
        try:
            chosen = parse_level(level, "--log-level")
        except ValueError as exc:
            raise ConfigurationError(str(exc)) from None
    elif verbosity:
        chosen = {-1: logging.ERROR, 1: logging.INFO}.get(verbosity, logging.DEBUG)
    else:
        chosen = parse_level(setting_level)
    return LogOptions(level=chosen, format=(format or setting_format),  # type: ignore[arg-type]
                      levels=parse_levels(setting_levels), secrets=secrets)


@dataclass(frozen=True)
class RunLogOptions:
    """A run's own log file: JSON lines in ``directory``, rotated at ``max_bytes`` keeping ``backups`` old files."""

    directory: Path
    level: int = logging.INFO
    levels: Mapping[str, int] = field(default_factory=dict)
    max_bytes: int = 10 * 1024 * 1024
    backups: int = 5
    secrets: tuple[str, ...] = ()


def formatter_for(kind: str, secrets: Iterable[str] = ()) -> logging.Formatter:
    return structured_formatter(secrets) if kind == "json" else TextFormatter(secrets)


def _levels(options_levels: Mapping[str, int]) -> dict[str, int]:
    return {**QUIET_LOGGERS, **options_levels}


@contextlib.contextmanager
def logging_configured(options: LogOptions) -> Iterator[logging.Handler]:
    """Send log lines to stderr per ``options`` for the block (the handler it yields), and restore the logging tree
    afterwards: the root and package levels, each per-module level set, the handler."""
    levels = _levels(options.levels)
    handler = StderrHandler()
    handler.setFormatter(formatter_for(options.format, options.secrets))
    handler.addFilter(ThresholdFilter(options.level, levels))
    with _levels_lowered({"": options.level, PACKAGE: options.level, **levels}), _attached(handler):
        yield handler


@contextlib.contextmanager
def _attached(handler: logging.Handler) -> Iterator[None]:
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()


@contextlib.contextmanager
def _levels_lowered(levels: Mapping[str, int]) -> Iterator[None]:
    """Set each logger's level to at most the one given (the root to exactly it), and put every level back."""
    saved = {name: logging.getLogger(name).level for name in levels}
    for name, level in levels.items():
        logger = logging.getLogger(name)
        current = logger.level
        logger.setLevel(level if not name or current == logging.NOTSET else min(current, level))
    try:
        yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def add_secrets(secrets: Iterable[str | None]) -> None:
    """Redact these too in every line our handlers write from now on (a key given with ``--api-key``)."""
    found = {s for s in secrets if s}
    for handler in logging.getLogger().handlers:
        formatter = handler.formatter
        if isinstance(formatter, _Redacting):
            formatter.secrets |= found


def run_log_directory(base: Path, database: str) -> Path:
    """``<base>/<database name>-<hash>``: run ids are per database, so each database's run logs have a folder."""
    import hashlib
    import re

    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", database.rstrip("/").rsplit("/", 1)[-1].split("?")[0]) or "database"
    return base / f"{Path(name).stem[:40]}-{hashlib.sha256(database.encode()).hexdigest()[:8]}"


def run_log_path(directory: Path, run_id: int) -> Path:
    """``<directory>/run-<id>-<pid>.log``: one file per process working on the run (several may, on one machine)."""
    return directory / f"run-{run_id}-{os.getpid()}.log"


def run_log_files(directory: Path, run_id: int) -> list[Path]:
    """Every log file of the run in ``directory``, rotated ones included: per process, oldest first (``.log.2``,
    ``.log.1``, ``.log``)."""
    files = [*directory.glob(f"run-{run_id}-*.log"), *directory.glob(f"run-{run_id}-*.log.*")]

    def order(path: Path) -> tuple[str, int]:
        base, _, rotation = path.name.partition(".log")
        return base, -int(rotation.lstrip(".") or 0) if rotation.lstrip(".").isdigit() or not rotation else 0

    return sorted(files, key=order)


@contextlib.contextmanager
def run_log(options: RunLogOptions | None, run_id: int) -> Iterator[Path | None]:
    """Write the run's lines (JSON, the run's context on each) to its own rotated file for the block; yields the
    path, or None when ``options`` is None or the directory cannot be made (said once, as a warning)."""
    if options is None:
        yield None
        return
    path = run_log_path(options.directory, run_id)
    try:
        options.directory.mkdir(parents=True, exist_ok=True)
        import logging.handlers  # here: the status commands configure the console only

        handler = logging.handlers.RotatingFileHandler(path, maxBytes=options.max_bytes,
                                                       backupCount=options.backups, encoding="utf-8")
    except OSError as exc:
        logging.getLogger(__name__).warning("no run log file: cannot write %s: %s", path, exc.strerror or exc)
        yield None
        return
    levels = _levels(options.levels)
    handler.setFormatter(structured_formatter(_handler_secrets(options.secrets)))
    handler.addFilter(ThresholdFilter(options.level, levels))
    with _levels_lowered({PACKAGE: options.level, **options.levels}), _attached(handler), bound(run_id=run_id):
        yield path


def _handler_secrets(extra: Iterable[str]) -> set[str]:
    """The secrets the console's formatter already redacts (``--api-key`` included), and ``extra``."""
    found = set(extra)
    for handler in logging.getLogger().handlers:
        if isinstance(handler.formatter, _Redacting):
            found |= handler.formatter.secrets
    return found


def read_log_lines(paths: Iterable[Path]) -> Iterator[dict[str, Any]]:
    """The JSON objects of log files, in file order; a line that is not one (a torn last line) is skipped."""
    for path in paths:
        with path.open(encoding="utf-8", errors="replace") as handle:
            for line in handle:
                with contextlib.suppress(ValueError):
                    data = json.loads(line)
                    if isinstance(data, dict):
                        yield data
