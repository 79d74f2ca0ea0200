"""Opening the database: the engine, SQLite pragmas, and migrations applied on open."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, OperationalError
from sqlalchemy.pool import StaticPool

from flashcard_pipeline.config import DatabaseSettings, GeneralSettings, read_settings, setting_location
from flashcard_pipeline.config_files import SQLITE_SUFFIXES as SQLITE_SUFFIXES
from flashcard_pipeline.config_files import default_database_path as default_database_path
from flashcard_pipeline.config_files import sqlite_file
from flashcard_pipeline.errors import ConfigurationError
from flashcard_pipeline.storage.pool_monitor import MonitoredQueuePool, PoolMonitor
from flashcard_pipeline.storage.revision import head_revision

DATABASE_URL_ENV = "FLASHCARD_DATABASE_URL"


def resolve_database_url(url: str | None = None, env: dict[str, str] | None = None) -> str:
    """A SQLAlchemy URL for ``--db`` / FLASHCARD_DATABASE_URL / the config file's / the default file.

    A bare value is a SQLite file only when it looks like one (an existing file, or a name ending in .db,
    .sqlite, .sqlite3 or .db3): a mistyped URL such as ``postgresql:/x`` or ``not a url`` must not quietly
    become a new SQLite file in the current folder, with the user's runs in the other database.
    """
    configured = env is None  # the real environment: the config file counts too
    env = dict(os.environ) if env is None else env
    chosen = (url or env.get(DATABASE_URL_ENV) or "").strip()
    source = "--db" if url else DATABASE_URL_ENV
    if not chosen and configured:
        chosen = (read_settings(GeneralSettings).database_url or "").strip()
        source = setting_location(GeneralSettings, "database_url")
    if not chosen:
        return f"sqlite:///{default_database_path(env)}"
    if "://" in chosen:
        return chosen
    path = sqlite_file(chosen)
    if path is None:
        raise ConfigurationError(
            f"{source} {chosen!r} is neither a database URL nor a SQLite file: use a URL such as "
            f"postgresql://USER@HOST/DB or sqlite:///PATH, or a file name ending in {', '.join(SQLITE_SUFFIXES)}")
    return f"sqlite:///{path}"


def require_postgresql(url: str, what: str) -> None:
    """Several processes on one run need a database they can all reach and write at once: PostgreSQL."""
    try:
        backend = make_url(url).get_backend_name()
    except ArgumentError:
        backend = ""
    if backend != "postgresql":
        raise ConfigurationError(
            f"{what} needs PostgreSQL: SQLite takes one writer at a time on one machine, so it stays the "
            "single-process default; use --db postgresql://USER@HOST/DB (see docs/scaling.md)")


def sqlite_path(url: str) -> Path | None:
    """The file of a file-backed SQLite URL, else None."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        return None
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return None
    return Path(parsed.database)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def create_db_engine(url: str, settings: DatabaseSettings | None = None) -> Engine:
    """An engine with a monitored QueuePool sized by ``settings`` (DB_* environment variables).

    File SQLite databases get WAL, ``synchronous=NORMAL``, a busy timeout and their folder created;
    PostgreSQL goes through psycopg 3 (a bare ``postgresql://`` URL is taken to mean it).
    """
    settings = settings or read_settings(DatabaseSettings)
    try:
        parsed = make_url(url)
    except Exception as exc:
        raise ConfigurationError(f"not a database URL: {url!r}") from exc
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    pool_args: dict[str, Any] = {
        "poolclass": MonitoredQueuePool, "pool_size": settings.pool_size, "max_overflow": settings.max_overflow,
        "pool_recycle": settings.pool_recycle, "pool_timeout": settings.pool_timeout,
        "pool_pre_ping": settings.pool_pre_ping,
    }
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database
        if not database or database == ":memory:":
            # One shared connection, or every thread would see its own empty database.
            engine = create_engine(parsed, connect_args={"check_same_thread": False}, poolclass=StaticPool)
            event.listen(engine, "connect", _sqlite_pragmas)
            return engine
        Path(database).parent.mkdir(parents=True, exist_ok=True)
        # A file's connection cannot go stale as a server's can: a ping before every checkout is pure cost.
        pool_args["pool_pre_ping"] = False
        engine = create_engine(parsed, connect_args={"check_same_thread": False}, **pool_args)
        event.listen(engine, "connect", _sqlite_pragmas)
    else:
        try:
            engine = create_engine(parsed, **pool_args)
        except (ArgumentError, ImportError) as exc:  # NoSuchModuleError is an ArgumentError
            raise ConfigurationError(
                f"cannot use database {parsed.render_as_string(hide_password=True)}: {exc}; "
                "use a SQLite path, sqlite:///PATH or postgresql://USER@HOST/DB") from exc
    PoolMonitor().attach(engine)
    return engine


def local_reader(engine: Engine) -> Connection | None:
    """A connection whose reads may run on the event loop's own thread, or None for a database that must be read
    from a thread.

    A SQLite file in WAL mode answers an indexed read in tens of microseconds and its readers never wait for the
    writer; handing such a read to a thread costs several times more, most of it the thread and the event loop
    passing the GIL back and forth. The connection gives up at once instead of waiting for a lock (it never should
    in WAL mode): its caller then reads from a thread, where waiting blocks nothing. A server's round trip, a
    database in another journal mode (where writers lock readers out), or a file found locked while this looks,
    stays in a thread."""
    if engine.dialect.name != "sqlite" or sqlite_path(engine.url.render_as_string(hide_password=False)) is None:
        return None
    connection = engine.connect()
    try:
        if str(connection.exec_driver_sql("PRAGMA journal_mode").scalar()).lower() == "wal":
            connection.exec_driver_sql("PRAGMA busy_timeout=0")
            connection.rollback()
            return connection
    except OperationalError:
        pass
    close_local_reader(connection)
    return None


def close_local_reader(connection: Connection) -> None:
    """Close what :func:`local_reader` opened; its DBAPI connection is not pooled again (its busy timeout is 0)."""
    connection.invalidate()
    connection.close()


def pool_monitor(engine: Engine) -> PoolMonitor | None:
    return getattr(engine.pool, "monitor", None)


def _version(connection: Any) -> list[str] | None:
    """The schema's revision(s), or None when Alembic never ran on it (a new database). Asked without a failing
    statement, which would abort the migration's transaction on PostgreSQL."""
    if not inspect(connection).has_table("alembic_version"):
        return None
    return list(connection.execute(text("SELECT version_num FROM alembic_version")).scalars())


def _at_head(engine: Engine) -> bool:
    """Whether the schema is already current: then opening costs one query instead of Alembic's start-up."""
    head = head_revision()
    if head is None:
        return False
    with engine.connect() as connection:
        return _version(connection) == [head]


#: Any constant: the key of the PostgreSQL advisory lock migrations hold.
_MIGRATION_LOCK = 0x464C5348


def _lock_for_migration(connection: Any) -> None:
    """One migrator at a time per database: a second process that opens a new database while the first creates its
    tables (`monitor` started beside `process`, two workers) waits, then finds the schema current, instead of
    creating the same tables again and failing."""
    dialect = connection.dialect.name
    if dialect == "sqlite":
        connection.exec_driver_sql("BEGIN EXCLUSIVE")  # the whole migration is one transaction, under the lock
    elif dialect == "postgresql":
        connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK})")


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest revision (idempotent; runs on every open, Alembic only when needed)."""
    if _at_head(engine):
        return
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", "flashcard_pipeline.storage:migrations")
    with engine.begin() as connection:
        _lock_for_migration(connection)
        head = head_revision()
        if head is not None and _version(connection) == [head]:
            return  # another process migrated it while this one waited for the lock
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


def open_database(url: str | None = None, *, must_exist: bool = False) -> Engine:
    """The migrated database. ``must_exist`` is for commands that only read what runs stored: a SQLite file
    that is not there is a usage error (a typo in ``--db``), not a new empty database."""
    settings = read_settings(DatabaseSettings)
    resolved = resolve_database_url(url)
    if must_exist and (path := sqlite_path(resolved)) is not None and not path.exists():
        hint = "" if url else "; run `flashcard-pipeline process` first, or name one with --db"
        raise ConfigurationError(f"no database at {path}{hint}")
    engine = create_db_engine(resolved, settings)
    try:
        migrate(engine)
    except Exception as exc:
        engine.dispose()
        cause = getattr(exc, "orig", None) or exc  # the driver's own words, not SQLAlchemy's wrapper
        reason = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        raise ConfigurationError(f"cannot open database {engine.url.render_as_string(hide_password=True)}: "
                                 f"{reason}") from exc
    return engine
