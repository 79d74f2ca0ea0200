"""Where settings live on disk: the config files in effect and the data directory.

Split from :mod:`flashcard_pipeline.config` because it needs only the standard library: the status commands'
quick settings (``quick_settings.py``) find the same files without loading pydantic-settings.
"""

from __future__ import annotations

import contextlib
import os
import re
import tomllib
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from flashcard_pipeline.errors import ConfigurationError

CONFIG_FILE_NAME = "flashcard-pipeline.toml"
#: A config file to use instead of the working directory's and the user's.
CONFIG_FILE_ENV = "FLASHCARD_CONFIG"

#: Files ``config validate FILE`` checks instead of the ones found (a context variable, reset on exit).
_FILES_OVERRIDE: ContextVar[tuple[Path, ...] | None] = ContextVar("flashcard_config_files", default=None)


def data_directory(env: Mapping[str, str] | None = None) -> Path:
    """``$XDG_DATA_HOME/flashcard-pipeline`` (``~/.local/share/...`` when unset): the default database, run logs."""
    env = os.environ if env is None else env
    return Path(env.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "flashcard-pipeline"


def user_config_file(env: Mapping[str, str] | None = None) -> Path:
    """``$XDG_CONFIG_HOME/flashcard-pipeline/flashcard-pipeline.toml`` (``~/.config/...`` when unset)."""
    env = os.environ if env is None else env
    base = Path(env.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "flashcard-pipeline" / CONFIG_FILE_NAME


def config_files(env: Mapping[str, str] | None = None) -> list[Path]:
    """The config files in effect, strongest first: ``$FLASHCARD_CONFIG`` alone when it is set (it must exist),
    else those of ``./flashcard-pipeline.toml`` and the user's file that exist."""
    override = _FILES_OVERRIDE.get()
    if override is not None:
        return list(override)
    env = os.environ if env is None else env
    if explicit := env.get(CONFIG_FILE_ENV, "").strip():
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise ConfigurationError(f"{CONFIG_FILE_ENV}={explicit}: no such file")
        return [path]
    return [path for path in (Path.cwd() / CONFIG_FILE_NAME, user_config_file(env)) if path.is_file()]


@contextlib.contextmanager
def using_config_files(files: list[Path]) -> Iterator[None]:
    """Read settings from ``files`` (strongest first) instead of the ones found, inside the block."""
    token = _FILES_OVERRIDE.set(tuple(files))
    try:
        yield
    finally:
        _FILES_OVERRIDE.reset(token)


def read_config_file(path: Path) -> dict[str, Any]:
    """The TOML document of ``path``; unreadable or invalid TOML is a one-line :class:`ConfigurationError`."""
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError(f"{path}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigurationError(f"cannot read {path}: {exc.strerror or exc}") from None


def default_database_path(env: Mapping[str, str] | None = None) -> Path:
    """``$XDG_DATA_HOME/flashcard-pipeline/flashcards.db`` (``~/.local/share/...`` when unset).

    One file per user, so the cache of paid answers serves every project of that user.
    """
    return data_directory(env) / "flashcards.db"


#: What a bare SQLite file name ends with; anything else that is not an existing file is taken for a typo.
SQLITE_SUFFIXES = (".db", ".sqlite", ".sqlite3", ".db3")
_DRIVE = re.compile(r"^[A-Za-z]:[\\/]")


def sqlite_file(chosen: str) -> Path | None:
    """The SQLite file a bare ``--db`` value names (resolved), or None when it does not look like one."""
    path = Path(chosen).expanduser()
    looks_like_url = ":" in chosen and not _DRIVE.match(chosen)
    if looks_like_url or not (path.is_file() or path.suffix.lower() in SQLITE_SUFFIXES):
        return None
    return path.resolve()
