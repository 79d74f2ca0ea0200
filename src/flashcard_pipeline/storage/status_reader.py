"""What the status commands read, two ways: :class:`StatusReader` over the standard library's sqlite3 (or psycopg
for PostgreSQL), which starts in a few milliseconds, and :class:`FullStatus` over the SQLAlchemy stores.

The quick reader is used only when the database is at this package's schema revision (a database that needs a
migration opens the full way, which migrates it), and it builds the same records from the same rows
(``storage/records.py``). Its SQL is the SQL the stores' queries compile to, kept short;
tests/test_status_reader.py checks that both readers return equal records, and that every status command prints
the same on both paths, on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

from flashcard_pipeline.storage.records import (
    COMMAND_COLUMNS,
    EVENT_COLUMNS,
    RUN_COLUMNS,
    SNAPSHOT_COLUMNS,
    WORKER_COLUMNS,
    BreakerCommand,
    BreakerEventRecord,
    CircuitSnapshotRecord,
    FailedItem,
    QuarantinedItem,
    RunRecord,
    RunSummary,
    StageState,
    WorkerRecord,
    command_record,
    errors_by_code,
    event_record,
    run_record,
    snapshot_record,
    worker_record,
)
from flashcard_pipeline.storage.revision import head_revision

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from flashcard_pipeline.quick_settings import DatabaseTarget, QuickSettings


class StatusSource(Protocol):
    """The reads of ``runs list|show``, ``breaker status``, ``ratelimit status`` and ``monitor``."""

    def get_run(self, run_id: int | None = None) -> RunRecord | None: ...
    def runs(self, limit: int | None = None) -> list[RunRecord]: ...
    def run_metrics(self, run_id: int) -> dict[str, Any] | None: ...
    def summary(self, run_id: int) -> RunSummary: ...
    def summaries(self, run_ids: Sequence[int]) -> dict[int, RunSummary]: ...
    def errors_by_code(self, run_id: int) -> dict[str, int]: ...
    def failures(self, run_id: int) -> list[FailedItem]: ...
    def quarantined(self, run_id: int) -> list[QuarantinedItem]: ...
    def recent_activity(self, run_id: int, since: datetime) -> tuple[int, int]: ...
    def workers(self, run_id: int) -> list[WorkerRecord]: ...
    def snapshots(self) -> list[CircuitSnapshotRecord]: ...
    def events(self, limit: int = 20) -> list[BreakerEventRecord]: ...
    def latest_commands(self) -> dict[str, BreakerCommand]: ...
    def recent_commands(self, limit: int = 20) -> list[BreakerCommand]: ...
    def close(self) -> None: ...


class FullStatus:
    """:class:`StatusSource` over the SQLAlchemy stores of an open engine (closing it disposes of the engine)."""

    def __init__(self, engine: Engine) -> None:
        from flashcard_pipeline.storage.breaker_store import BreakerStore
        from flashcard_pipeline.storage.leases import LeaseStore
        from flashcard_pipeline.storage.ledger import Ledger

        self.engine = engine
        self.ledger = Ledger(engine)
        self.breakers = BreakerStore(engine)
        self.leases = LeaseStore(engine)

    def get_run(self, run_id: int | None = None) -> RunRecord | None:
        return self.ledger.get_run(run_id)

    def runs(self, limit: int | None = None) -> list[RunRecord]:
        return self.ledger.runs(limit=limit)

    def run_metrics(self, run_id: int) -> dict[str, Any] | None:
        return self.ledger.run_metrics(run_id)

    def summary(self, run_id: int) -> RunSummary:
        return self.ledger.summary(run_id)

    def summaries(self, run_ids: Sequence[int]) -> dict[int, RunSummary]:
        return self.ledger.summaries(run_ids)

    def errors_by_code(self, run_id: int) -> dict[str, int]:
        return self.ledger.errors_by_code(run_id)

    def failures(self, run_id: int) -> list[FailedItem]:
        return self.ledger.failures(run_id)

    def quarantined(self, run_id: int) -> list[QuarantinedItem]:
        return self.ledger.quarantined(run_id)

    def recent_activity(self, run_id: int, since: datetime) -> tuple[int, int]:
        return self.ledger.recent_activity(run_id, since)

    def workers(self, run_id: int) -> list[WorkerRecord]:
        return self.leases.workers(run_id)

    def snapshots(self) -> list[CircuitSnapshotRecord]:
        return self.breakers.snapshots()

    def events(self, limit: int = 20) -> list[BreakerEventRecord]:
        return self.breakers.events(limit=limit)

    def latest_commands(self) -> dict[str, BreakerCommand]:
        return self.breakers.latest_commands()

    def recent_commands(self, limit: int = 20) -> list[BreakerCommand]:
        return self.breakers.recent_commands(limit=limit)

    def close(self) -> None:
        self.engine.dispose()


#: Columns SQLite hands back as text that SQLAlchemy's DateTime parses (``datetime.fromisoformat``, naive UTC).
_TIMES = frozenset({"created_at", "updated_at", "finished_at", "since", "open_until", "started_at",
                    "last_heartbeat", "stopped_at"})


def _sqlite_time(value: datetime) -> str:
    """A datetime as SQLAlchemy's SQLite DateTime binds it: its fields as they are (the zone dropped, not
    converted), microseconds always, so that text comparison orders it with the stored values."""
    return (f"{value.year:04d}-{value.month:02d}-{value.day:02d} {value.hour:02d}:{value.minute:02d}:"
            f"{value.second:02d}.{value.microsecond:06d}")


def _columns(names: Sequence[str]) -> str:
    return ", ".join(names)


class StatusReader:
    """:class:`StatusSource` over one DB-API connection, read-only; :meth:`open` returns None when the database is
    not at this package's schema revision (or cannot be opened: the full path says why)."""

    def __init__(self, connection: Any, dialect: str) -> None:
        self.connection = connection
        self.dialect = dialect

    @classmethod
    def open(cls, target: DatabaseTarget) -> StatusReader | None:
        head = head_revision()
        if head is None:
            return None
        if target.dialect == "sqlite":
            import sqlite3

            try:
                connection: Any = sqlite3.connect(target.path or "", timeout=30.0, check_same_thread=False)
            except sqlite3.Error:
                return None
            errors: tuple[type[Exception], ...] = (sqlite3.Error,)
        else:
            import psycopg

            try:
                connection = psycopg.connect(target.conninfo or "", autocommit=True)
            except psycopg.Error:
                return None
            errors = (psycopg.Error,)
        reader = cls(connection, target.dialect)
        try:
            versions = [row[0] for row in reader._rows("SELECT version_num FROM alembic_version")]
        except errors:
            versions = []
        if versions != [head]:
            reader.close()
            return None
        return reader

    def close(self) -> None:
        self.connection.close()

    def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        if self.dialect != "sqlite":
            sql = sql.replace("?", "%s")
        cursor = self.connection.execute(sql, tuple(_sqlite_time(p) if self.dialect == "sqlite" and
                                                    isinstance(p, datetime) else p for p in params))
        try:
            return list(cursor.fetchall())
        finally:
            cursor.close()

    def _records(self, sql: str, columns: Sequence[str], params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        found = []
        for row in self._rows(sql, params):
            record = dict(zip(columns, row, strict=True))
            if self.dialect == "sqlite":
                for key in _TIMES.intersection(record):
                    if isinstance(record[key], str):
                        record[key] = datetime.fromisoformat(record[key])
            found.append(record)
        return found

    # runs -------------------------------------------------------------------------------------------------------

    def get_run(self, run_id: int | None = None) -> RunRecord | None:
        where, params = ("WHERE id = ? ", (run_id,)) if run_id is not None else ("", ())
        rows = self._records(f"SELECT {_columns(RUN_COLUMNS)} FROM runs {where}ORDER BY id DESC LIMIT 1",
                             RUN_COLUMNS, params)
        return run_record(rows[0]) if rows else None

    def runs(self, limit: int | None = None) -> list[RunRecord]:
        tail, params = (" LIMIT ?", (limit,)) if limit is not None else ("", ())
        return [run_record(row) for row in self._records(
            f"SELECT {_columns(RUN_COLUMNS)} FROM runs ORDER BY id DESC{tail}", RUN_COLUMNS, params)]

    def run_metrics(self, run_id: int) -> dict[str, Any] | None:
        rows = self._rows("SELECT metrics_json FROM runs WHERE id = ?", (run_id,))
        raw = rows[0][0] if rows else None
        return None if raw is None else json.loads(raw)

    def summary(self, run_id: int) -> RunSummary:
        s = RunSummary()
        for nuance, cards, count in self._rows(
                "SELECT nuance_state, cards_state, count(*) FROM items WHERE run_id = ? "
                "GROUP BY nuance_state, cards_state", (run_id,)):
            s.count_items(nuance, cards, count)
        for status, category, count, tin, tout, cost in self._rows(
                "SELECT status, error_category, count(*), coalesce(sum(tokens_in), 0), coalesce(sum(tokens_out), 0), "
                "coalesce(sum(cost_usd), 0.0) FROM api_calls WHERE run_id = ? GROUP BY status, error_category",
                (run_id,)):
            s.count_calls(status, category, count, tin, tout, cost)
        s.cached_stages = self._rows(
            "SELECT count(*) FROM stage_results JOIN items ON items.id = stage_results.item_id "
            "WHERE items.run_id = ? AND stage_results.from_cache = ?", (run_id, True))[0][0] or 0
        return s

    def summaries(self, run_ids: Sequence[int]) -> dict[int, RunSummary]:
        found = {run_id: RunSummary() for run_id in run_ids}
        if not found:
            return found
        marks = ", ".join("?" for _ in found)
        for run_id, nuance, cards, count in self._rows(
                f"SELECT run_id, nuance_state, cards_state, count(*) FROM items WHERE run_id IN ({marks}) "
                "GROUP BY run_id, nuance_state, cards_state", list(found)):
            found[run_id].count_items(nuance, cards, count)
        for run_id, status, count, tin, tout, cost in self._rows(
                "SELECT run_id, status, count(*), coalesce(sum(tokens_in), 0), coalesce(sum(tokens_out), 0), "
                f"coalesce(sum(cost_usd), 0.0) FROM api_calls WHERE run_id IN ({marks}) GROUP BY run_id, status",
                list(found)):
            found[run_id].count_calls(status, None, count, tin, tout, cost, by_error=False)
        return found

    def errors_by_code(self, run_id: int) -> dict[str, int]:
        return errors_by_code([(category, code, count) for category, code, count in self._rows(
            "SELECT error_category, error_code, count(*) FROM api_calls WHERE run_id = ? AND status != ? "
            "GROUP BY error_category, error_code", (run_id, "ok"))])

    def _items_in(self, run_id: int, state: StageState) -> list[tuple[Any, ...]]:
        return self._rows("SELECT position, term, error_stage, error_category, error_code, error_message, "
                          "last_answer FROM items WHERE run_id = ? AND (nuance_state = ? OR cards_state = ?) "
                          "ORDER BY position", (run_id, str(state), str(state)))

    def failures(self, run_id: int) -> list[FailedItem]:
        return [FailedItem(position, term, stage, category, code, message)
                for position, term, stage, category, code, message, _ in self._items_in(run_id, StageState.FAILED)]

    def quarantined(self, run_id: int) -> list[QuarantinedItem]:
        return [QuarantinedItem(position, term, stage, code, message, answer)
                for position, term, stage, _, code, message, answer in self._items_in(run_id,
                                                                                      StageState.QUARANTINED)]

    def recent_activity(self, run_id: int, since: datetime) -> tuple[int, int]:
        calls = self._rows("SELECT count(*) FROM api_calls WHERE run_id = ? AND created_at >= ?",
                           (run_id, since))[0][0] or 0
        items = self._rows("SELECT count(*) FROM items WHERE run_id = ? AND cards_state = ? AND updated_at >= ?",
                           (run_id, str(StageState.DONE), since))[0][0] or 0
        return calls, items

    def workers(self, run_id: int) -> list[WorkerRecord]:
        return [worker_record(row) for row in self._records(
            f"SELECT {_columns(WORKER_COLUMNS)} FROM workers WHERE run_id = ? ORDER BY id", WORKER_COLUMNS,
            (run_id,))]

    # circuit breakers -------------------------------------------------------------------------------------------

    def snapshots(self) -> list[CircuitSnapshotRecord]:
        return [snapshot_record(row) for row in self._records(
            f"SELECT {_columns(SNAPSHOT_COLUMNS)} FROM circuit_breaker_states ORDER BY circuit, updated_at DESC",
            SNAPSHOT_COLUMNS)]

    def events(self, limit: int = 20) -> list[BreakerEventRecord]:
        """The newest ``limit`` transitions and manual actions, oldest first."""
        return [event_record(row) for row in self._records(
            f"SELECT {_columns(EVENT_COLUMNS)} FROM circuit_breaker_events ORDER BY id DESC LIMIT ?",
            EVENT_COLUMNS, (limit,))][::-1]

    def latest_commands(self) -> dict[str, BreakerCommand]:
        rows = self._records(f"SELECT {_columns(COMMAND_COLUMNS)} FROM circuit_breaker_commands WHERE id IN "
                             "(SELECT max(id) FROM circuit_breaker_commands GROUP BY circuit)", COMMAND_COLUMNS)
        return {row["circuit"]: command_record(row) for row in rows}

    def recent_commands(self, limit: int = 20) -> list[BreakerCommand]:
        return [command_record(row) for row in self._records(
            f"SELECT {_columns(COMMAND_COLUMNS)} FROM circuit_breaker_commands ORDER BY id DESC LIMIT ?",
            COMMAND_COLUMNS, (limit,))][::-1]


def open_status(db: str | None, settings: QuickSettings | None) -> StatusSource:
    """The quick reader when the settings (:func:`flashcard_pipeline.quick_settings.read`) and the database allow
    it, else the full path's stores (which also report a missing file or a bad setting, or migrate an old
    schema)."""
    from flashcard_pipeline.quick_settings import database_target

    target = database_target(db, settings) if settings is not None else None
    reader = StatusReader.open(target) if target is not None else None
    if reader is not None:
        return reader
    from flashcard_pipeline.storage.db import open_database

    return FullStatus(open_database(db, must_exist=True))
