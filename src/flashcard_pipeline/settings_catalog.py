"""Every setting with its variable, file key, default, constraints and meaning: what `config show`, `config init`
and docs/settings.md list, all made from the settings classes of :mod:`flashcard_pipeline.config`.

Fields that carry a ``description`` speak for themselves; :data:`NOTES` gives the meaning of the others (the
resilience engine's models keep their ``#:`` comments for developers). tests/test_config.py fails when a setting
has neither, or when a note names no setting.
"""

from __future__ import annotations

import json
import math
import textwrap
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from typing import Any

from pydantic import SecretStr
from pydantic.fields import FieldInfo

from flashcard_pipeline.config import (
    CONFIG_FILE_ENV,
    CONFIG_FILE_NAME,
    SETTINGS,
    FileSettings,
    KeySettings,
    env_name,
    setting_source,
)
from flashcard_pipeline.services import masked_url

NOTES: dict[str, str] = {
    "DB_POOL_SIZE": "connections kept open",
    "DB_MAX_OVERFLOW": "extra connections under a burst",
    "DB_POOL_PRE_PING": "test a connection before handing it out",
    "CACHE_COMPRESSION_ENABLED": "false stores values as they are",
    "CACHE_COMPRESSION_LEVEL": "zlib level of compressed values",
    "CACHE_COMPRESSION_DICTIONARY": "compress with the preset dictionary shipped with the package",
    "CACHE_TTL_CARDS": "seconds a stage 2 answer lives; unset: never expires",
    "CACHE_BACKEND": "database (the ledger) or redis (shared by every worker using CACHE_REDIS_URL)",
    "CACHE_REDIS_URL": "the Redis of CACHE_BACKEND=redis",
    "CACHE_REDIS_PREFIX": "key prefix of the cache in Redis",
    "RETRY_MAX_ATTEMPTS": "calls per request before a transient error (429, 5xx, 408, network, timeout, empty or "
                          "truncated answer) fails the item (process --max-attempts wins)",
    "RETRY_INITIAL_DELAY": "seconds before the first retry",
    "RETRY_MAX_DELAY": "the longest back-off between two calls",
    "RETRY_EXPONENTIAL_BASE": "growth of the back-off per retry",
    "RETRY_JITTER_ENABLED": "randomise each wait so clients that failed together do not retry together",
    "RETRY_JITTER_STRATEGY": "plan (half to all of the delay), full, decorrelated or none",
    "RETRY_MAX_ELAPSED": "seconds from a request's first call after which no retry starts (waits for an open "
                         "circuit or the rate limiter do not count)",
    "RETRY_MAX_RETRY_AFTER": "a server asking to wait longer than this fails the item at once instead",
    "RETRY_MAX_REASKS": "extra calls after invalid JSON or a schema violation, counted separately",
    "RETRY_RETRY_CATEGORIES": "error categories that are retried (comma list or JSON)",
    "CB_FAILURE_RATIO": "share of failed calls in the window that opens the circuit",
    "CB_MIN_THROUGHPUT": "calls the window must hold before the ratio means anything",
    "CB_CONFIDENCE": "trip only when the ratio's Wilson lower bound at this one-sided confidence reaches "
                     "CB_FAILURE_RATIO (0: the plain ratio)",
    "CB_RECENT_BUCKETS": "also trip on the newest buckets alone (twice CB_MIN_THROUGHPUT calls in them), so a "
                         "sudden outage opens in seconds (0: off)",
    "CB_SAMPLING_DURATION": "seconds of history the ratio is computed over",
    "CB_SAMPLING_BUCKETS": "time buckets in that window",
    "CB_BREAK_DURATION": "seconds of the first break",
    "CB_MAX_BREAK_DURATION": "the longest break",
    "CB_BREAK_DURATION_FACTOR": "growth of the break after each failed probe (1: always the same break)",
    "CB_HALF_OPEN_MAX_PROBES": "calls let through at once when half-open",
    "CB_PROBE_TIMEOUT": "seconds after which a probe that never reported frees its slot for another",
    "CB_FAILURE_CATEGORIES": "error categories that count as failures (comma list or JSON)",
    "CB_HISTORY_SIZE": "transitions each breaker keeps in memory",
    "CB_ENABLED": "false sends every call straight to the provider (retries still apply)",
    "CB_MAX_WAIT": "seconds an item waits for a circuit before it fails (process --breaker-max-wait wins)",
    "CB_POLL_INTERVAL": "seconds between two looks at the database for `breaker` commands",
    "RL_ENABLED": "false removes the limiter",
    "RL_REQUESTS_PER_MINUTE": "the provider's requests limit (process --rpm wins); unset: found adaptively",
    "RL_TOKENS_PER_MINUTE": "the provider's tokens limit (process --tpm wins); unset: not enforced until an "
                            "x-ratelimit-limit-tokens header gives it",
    "RL_ALGORITHM": "token_bucket, or sliding_window (in memory only)",
    "RL_BACKEND": "memory, or redis: every process using the same RL_REDIS_URL and RL_REDIS_PREFIX shares the "
                  "limits",
    "RL_REDIS_URL": "the Redis of RL_BACKEND=redis",
    "RL_REDIS_PREFIX": "key prefix of the limits in Redis",
    "RL_ADAPTIVE": "adapt to 429s and x-ratelimit-* headers",
    "RL_INITIAL_REQUESTS_PER_MINUTE": "where an unknown requests limit starts",
    "RL_MIN_PER_MINUTE": "the adaptive loop never plans below this",
    "RL_MAX_PAUSE": "the longest pause a 429 or a header imposes on everybody",
}

SECRET_MASK = "********"


@dataclass(frozen=True)
class Setting:
    """One setting as the catalog shows it."""

    section: str
    key: str
    env: str
    default: Any
    kind: str
    meaning: str
    secret: bool


def _description(cls: type[FileSettings], name: str, field: FieldInfo) -> str:
    return field.description or NOTES.get(env_name(cls, name), "")


def _kind(annotation: Any) -> str:
    """A short, human type: ``int``, ``float or unset``, ``one of: a, b``, ``list of: x, y``."""
    origin = typing.get_origin(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    optional = len(args) < len(typing.get_args(annotation))
    if origin is typing.Annotated:
        return _kind(args[0])
    if origin in (typing.Union, types.UnionType):
        text = " or ".join(_kind(a) for a in args)
        return f"{text} or unset" if optional else text
    if origin is typing.Literal:
        return "one of: " + ", ".join(str(a) for a in typing.get_args(annotation))
    if origin in (frozenset, set, list, tuple):
        inner = _kind(args[0]) if args else "text"
        return "list of: " + inner.removeprefix("one of: ")
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return "one of: " + ", ".join(str(m.value) for m in annotation)
    if annotation is SecretStr:
        return "secret text"
    return {bool: "true/false", int: "integer", float: "number", str: "text"}.get(annotation, str(annotation))


def _bounds(field: FieldInfo) -> str:
    """``≥ 1``, ``> 0, ≤ 1`` from the field's constraints."""
    found = []
    for item in field.metadata:
        for attribute, sign in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<")):
            value = getattr(item, attribute, None)
            if value is not None:
                found.append(f"{sign} {value:g}" if isinstance(value, float) else f"{sign} {value}")
    return ", ".join(found)


def settings() -> Iterator[Setting]:
    """Every setting of every class, in :data:`~flashcard_pipeline.config.SETTINGS` order."""
    for cls in SETTINGS:
        for name, field in cls.model_fields.items():
            kind = _kind(field.annotation)
            if bounds := _bounds(field):
                kind = f"{kind} ({bounds})"
            yield Setting(section=cls.config_section, key=name, env=env_name(cls, name), default=field.default,
                          kind=kind, meaning=_description(cls, name, field), secret=cls is KeySettings)


def plain(value: Any) -> Any:
    """A setting's value as JSON shows it: enums by value, sets as sorted lists, secrets masked."""
    if isinstance(value, SecretStr):
        return SECRET_MASK
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, frozenset | set):
        return sorted(plain(v) for v in value)
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


def shown(key: str, value: Any, *, secret: bool = False) -> Any:
    """The value of setting ``key`` fit for a screen or a log: secrets masked, passwords in URLs hidden."""
    value = plain(value)
    if secret and value is not None:
        return SECRET_MASK
    if isinstance(value, str) and key.endswith("url"):
        return masked_url(value)
    return value


def toml_value(value: Any) -> str:
    """``value`` written as TOML (strings are JSON strings, which TOML's basic strings accept)."""
    value = plain(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value) if not isinstance(value, float) or math.isfinite(value) else '"inf"'
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(str(value), ensure_ascii=False)


def effective() -> list[dict[str, Any]]:
    """Every setting's effective value and where it comes from (env, file or default), secrets masked; raises
    :class:`~flashcard_pipeline.errors.ConfigurationError` on the first bad value."""
    from flashcard_pipeline.config import read_settings

    rows = []
    for cls in SETTINGS:
        values = read_settings(cls)
        for name in cls.model_fields:
            rows.append({"section": cls.config_section, "key": name, "env": env_name(cls, name),
                         "value": shown(name, getattr(values, name), secret=cls is KeySettings),
                         "source": setting_source(cls, name)})
    return rows


def config_template() -> str:
    """The commented file `config init` writes: every setting with its default, commented out."""
    lines = [f"# {CONFIG_FILE_NAME}: settings for flashcard-pipeline (`flashcard-pipeline config show` prints the",
             "# effective values and where each comes from).",
             "#",
             "# Precedence: a command-line flag, then the environment variable named after each key, then this",
             f"# file (./{CONFIG_FILE_NAME} before the user's file; {CONFIG_FILE_ENV}=PATH uses one file only), then",
             "# the default. Uncomment a line to change it; `flashcard-pipeline config validate` checks the file.",
             "# Reference: docs/settings.md."]
    current = None
    for setting in settings():
        if setting.section != current:
            current = setting.section
            lines += ["", f"[{current}]"]
            if setting.secret:
                lines += ["# API keys may live here: keep the file private (chmod 600; a file others can read",
                          "# gets a warning). The environment variable, or --api-key, wins."]
        lines += [f"# {line}" for line in textwrap.wrap(setting.meaning, 96)]
        lines.append(f"# {setting.env}: {setting.kind}")
        if setting.default is None:
            lines.append(f"# {setting.key} =")
        else:
            lines.append(f"# {setting.key} = {toml_value(setting.default)}")
    return "\n".join(lines) + "\n"


def settings_markdown() -> str:
    """docs/settings.md: one table per section, made from the models (tests/test_config.py keeps it current)."""
    lines = ["# Settings reference", "",
             "Generated from the settings models by `python -m flashcard_pipeline.cli.reference`; do not edit by "
             "hand (tests/test_config.py fails when it differs).", "",
             "Every setting is an environment variable and a key of the config file. Precedence, strongest first: a "
             "command-line flag, the environment variable, the config file, the default. The config file is "
             f"`./{CONFIG_FILE_NAME}`, then `$XDG_CONFIG_HOME/flashcard-pipeline/{CONFIG_FILE_NAME}` "
             f"(`~/.config/...`; a key in the first wins over the same key in the second), or only "
             f"`${CONFIG_FILE_ENV}` when that is set. A key belongs to its section: `RETRY_MAX_ATTEMPTS` is "
             "`max_attempts` under `[retry]`. A section or key that does not exist is an error (exit 2), as is a "
             "bad value, named with its variable or its file and key. `flashcard-pipeline config init` writes a "
             "commented file with every default, `config show` prints the effective values and their sources "
             "(secrets masked), `config validate` checks a file and the environment.", ""]
    current = None
    for setting in settings():
        if setting.section != current:
            current = setting.section
            lines += ["", f"## [{current}]", "", "| variable | key | default | type | meaning |",
                      "|---|---|---|---|---|"]
        default = "unset" if setting.default is None else f"`{toml_value(setting.default)}`"
        lines.append(f"| `{setting.env}` | `{setting.key}` | {default} | {setting.kind} | "
                     f"{setting.meaning.replace('|', '/')} |")
    return "\n".join(lines) + "\n"
