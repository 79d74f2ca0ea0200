"""Opening the database: the engine, SQLite pragmas, and migrations applied on open."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url

from flashcard_pipeline.errors import ConfigurationError

DATABASE_URL_ENV = "FLASHCARD_DATABASE_URL"


def default_database_path(env: dict[str, str] | None = None) -> Path:
    """``$XDG_DATA_HOME/flashcard-pipeline/flashcards.db`` (``~/.local/share/...`` when unset).

    One file per user, so the cache of paid answers serves every project of that user.
    """
    env = dict(os.environ) if env is None else env
    base = Path(env.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return base / "flashcard-pipeline" / "flashcards.db"


def resolve_database_url(url: str | None = None, env: dict[str, str] | None = None) -> str:
    env = dict(os.environ) if env is None else env
    chosen = url or env.get(DATABASE_URL_ENV)
    if chosen:
        if "://" not in chosen:
            return f"sqlite:///{Path(chosen).expanduser().resolve()}"
        return chosen
    return f"sqlite:///{default_database_path(env)}"


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def create_db_engine(url: str) -> Engine:
    """An engine for ``url``; a file SQLite database gets WAL, a busy timeout and its folder created."""
    try:
        parsed = make_url(url)
    except Exception as exc:
        raise ConfigurationError(f"not a database URL: {url!r}") from exc
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True)


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest revision (idempotent; runs on every open)."""
    config = Config()
    config.set_main_option("script_location", "flashcard_pipeline.storage:migrations")
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


def open_database(url: str | None = None) -> Engine:
    engine = create_db_engine(resolve_database_url(url))
    try:
        migrate(engine)
    except Exception as exc:
        engine.dispose()
        raise ConfigurationError(f"cannot open database {engine.url.render_as_string(hide_password=True)}: "
                                 f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
    return engine
