"""The few settings the status commands need, read without pydantic-settings, so that they start fast.

``runs``, ``breaker status``, ``ratelimit status`` and ``monitor`` need where the database is, the console's
logging (``LOG_LEVEL``, ``LOG_FORMAT``, ``LOG_LEVELS`` and the keys to redact) and whether the rate limits live in
Redis. This module reads those from the environment and the config files with the precedence of
:mod:`flashcard_pipeline.config` (flag, environment, the strongest config file, default), and declines (returns
None, and the command takes the full path) whenever it could answer differently from it: a setting it does not
read (``DB_*``, ``RL_*``, ``[retry]``, ...), whose validation it does not repeat, a key it does not know, an
unusual spelling of a variable. tests/test_startup.py checks its answers against config.py's.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flashcard_pipeline.config_files import config_files, default_database_path, read_config_file, sqlite_file
from flashcard_pipeline.errors import ConfigurationError
from flashcard_pipeline.logging_config import LogOptions, console_options, parse_level, parse_levels

#: The settings read here: environment variable -> (config file section, key).
HANDLED: Mapping[str, tuple[str, str]] = {
    "FLASHCARD_DATABASE_URL": ("general", "database_url"),
    "LOG_LEVEL": ("logging", "level"),
    "LOG_FORMAT": ("logging", "format"),
    "LOG_LEVELS": ("logging", "levels"),
    "OPENROUTER_API_KEY": ("keys", "openrouter_api_key"),
    "OPENAI_API_KEY": ("keys", "openai_api_key"),
}
#: Variables of settings the commands validate (or use) on the full path but that are not read here: when one is
#: set, the full path decides. The prefixes are those of LogSettings, DatabaseSettings and RateLimitEnvironment.
DECLINED_PREFIXES = ("LOG_", "DB_", "RL_")
DECLINED_NAMES = frozenset({"FLASHCARD_MODEL_KIND"})
#: The defaults of the settings read here; tests/test_startup.py checks them against config.py's models.
DEFAULTS: Mapping[str, str | None] = {
    "database_url": None, "level": "WARNING", "format": "text", "levels": "", "openrouter_api_key": None,
    "openai_api_key": None,
}


def env_handling(name: str) -> str:
    """``handled``, ``declined`` (the full path decides when it is set) or ``ignored`` for a variable's name."""
    upper = name.upper()
    if upper in HANDLED:
        return "handled" if name == upper else "declined"  # pydantic-settings matches any case; os.environ not
    if upper in DECLINED_NAMES or upper.startswith(DECLINED_PREFIXES):
        return "declined"
    return "ignored"


@dataclass(frozen=True)
class QuickSettings:
    """The values of :data:`HANDLED` in effect (its keys' names), and that no setting of the rate limiter is set
    (so its backend is the default one, not Redis)."""

    database_url: str | None
    database_url_in_env: bool
    level: str
    format: str
    levels: str
    secrets: tuple[str, ...]


def read(env: Mapping[str, str] | None = None) -> QuickSettings | None:
    """The settings in effect, or None when the full path must decide."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    for name, value in env.items():
        handling = env_handling(name)
        if handling == "declined":
            return None
        if handling == "handled":
            values[HANDLED[name][1]] = value
    in_env = set(values)
    try:
        files = config_files(env)
    except ConfigurationError:
        return None
    known = {section: {key for s, key in HANDLED.values() if s == section} for section, _ in HANDLED.values()}
    for path in files:  # strongest first: its value of a key wins
        try:
            document = read_config_file(path)
        except ConfigurationError:
            return None
        for section, table in document.items():
            if section not in known or not isinstance(table, dict) or not set(table) <= known[section]:
                return None
            for key, value in table.items():
                if not isinstance(value, str):
                    return None
                values.setdefault(key, value)
    settings = {**DEFAULTS, **values}
    try:
        level = logging.getLevelName(parse_level(settings["level"]))
        parse_level(level)  # what LogSettings stores must parse again (LOG_LEVEL=15 does not)
        parse_levels(settings["levels"])
    except ValueError:
        return None
    log_format = settings["format"].strip().lower()
    if log_format not in ("text", "json"):
        return None
    secrets = tuple(settings[key] for key in ("openrouter_api_key", "openai_api_key") if settings[key] is not None)
    return QuickSettings(database_url=settings["database_url"], database_url_in_env="database_url" in in_env,
                         level=level, format=log_format, levels=settings["levels"], secrets=secrets)


def log_options(settings: QuickSettings, *, level: str | None, format: str | None, verbosity: int) -> LogOptions:
    """:func:`flashcard_pipeline.config.log_options` from these settings."""
    return console_options(level=level, format=format, verbosity=verbosity, setting_level=settings.level,
                           setting_format=settings.format, setting_levels=settings.levels, secrets=settings.secrets)


@dataclass(frozen=True)
class DatabaseTarget:
    """The database a status command reads: a SQLite file (``path``) or a PostgreSQL server (``conninfo``)."""

    dialect: str
    path: Path | None = None
    conninfo: str | None = None


_POSTGRESQL = ("postgresql://", "postgresql+psycopg://")


def database_target(flag: str | None, settings: QuickSettings,
                    env: Mapping[str, str] | None = None) -> DatabaseTarget | None:
    """Where ``--db`` / FLASHCARD_DATABASE_URL / the config file / the default put the database, as
    :func:`flashcard_pipeline.storage.db.resolve_database_url` finds it, when it is an existing SQLite file or a
    PostgreSQL URL for psycopg; None otherwise (a typo, a missing file, another driver, a SQLite URL with options:
    the full path reports or handles it)."""
    env = os.environ if env is None else env
    chosen = (flag or env.get("FLASHCARD_DATABASE_URL") or "").strip()
    if not chosen and not settings.database_url_in_env:
        chosen = (settings.database_url or "").strip()
    if not chosen:
        path: Path | None = default_database_path(env)
    elif "://" not in chosen:
        path = sqlite_file(chosen)
    elif chosen.startswith("sqlite:///"):
        path = Path(chosen.removeprefix("sqlite:///"))
        if not path.name or any(c in str(path) for c in "?%") or str(path) == ":memory:":
            return None
    elif chosen.startswith(_POSTGRESQL):  # libpq reads the URL (query options too) as SQLAlchemy passes it on
        return DatabaseTarget("postgresql", conninfo="postgresql://" + chosen.split("://", 1)[1])
    else:
        return None
    if path is None or not path.is_file():
        return None
    return DatabaseTarget("sqlite", path=path)
